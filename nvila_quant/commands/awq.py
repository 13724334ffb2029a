"""``nvila-quant awq``: AWQ-quantize an NVILA checkpoint into a packed NVILA folder (its quantizer flags, config and
report are shared with ``nvila-quant rtn``)."""

from __future__ import annotations

import argparse

from tqdm.contrib.logging import logging_redirect_tqdm

from nvila_quant.commands.common import add_device, add_dtype, add_model, add_output, add_overwrite, add_quiet
from nvila_quant.quant.config import BITS, FORMATS, GROUP_SIZES, NUMERICS, PRESETS, RATIO_SEARCHES, AWQConfig
from nvila_quant.quant.runner import quantize

__all__ = ["config_from_args", "quantizer_flags", "register", "report", "run"]

_DEFAULTS = AWQConfig()


def quantizer_flags(p: argparse.ArgumentParser) -> None:
    """The flags ``awq`` and ``rtn`` share: model, output, quantizer, format, device, dtype."""
    add_model(p, help="float NVILA checkpoint folder: three folders (config.json, llm/, vision_tower/, "
              "mm_projector/) or a flat -hf checkpoint")
    add_output(p, help="quantized NVILA folder to create (written to a temporary folder and renamed when complete)")
    p.add_argument("--layout", choices=["vila", "hf"], default=None,
                   help="layout of OUTPUT: vila (three folders; OUTPUT/llm is what vLLM serves) or hf (flat, what "
                   "SGLang serves with --trust-remote-code; autoawq or compressed-tensors) (default: the input's)")
    p.add_argument("--w-bit", type=int, choices=BITS, default=_DEFAULTS.bits, help="weight bits (default: 4; "
                   "autoawq and tinychat pack 4 only, compressed-tensors 2/3/4/8)")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=_DEFAULTS.group_size,
                   help="input channels per scale/zero group, -1 = per output channel (default: 128); layers it does "
                   "not divide fall back to 64, 32 or per channel with a warning")
    p.add_argument("--no-zero-point", action="store_true", help="symmetric quantization (no zero point)")
    p.add_argument("--targets", default="llm,projector", help="comma-separated sub-models to quantize: llm, "
                   "projector (int4 AWQ), vision_tower (W8A8 with a SmoothQuant search on the calibration images; "
                   "awq only, with --format compressed-tensors) (default: llm,projector)")
    p.add_argument("--format", choices=FORMATS, default=_DEFAULTS.format, help="packed checkpoint format "
                   "(default: autoawq, which vLLM/SGLang/transformers load)")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="also quantize lm_head (off by default; the reference keeps it in float). The head is the "
                   "largest single matrix (NVILA-8B: 152k x 3584, ~1 GB of each bf16 decode step's weight reads; "
                   "int4 makes it ~4x smaller) but every next-token distribution goes through it: `nvila-quant "
                   "compare` reports the KL it costs. awq searches it as one more scale group (final RMSNorm -> "
                   "lm_head) on a subset of the calibration tokens. A tied head is untied (embed_tokens stays "
                   "float) and the vocabulary is grown to the tokenizer and padded to a multiple of 64 first. The "
                   "config says \"lm_head\": true (AutoAWQ; a compressed-tensors target), which vLLM and SGLang "
                   "read; TensorRT-LLM's PyTorch backend keeps lm_head in float, so `convert --to trtllm` refuses it")
    add_device(p, default=_DEFAULTS.device, help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto)")
    add_dtype(p, "auto", auto=True, help="compute dtype (default: auto = fp16 on CUDA as the reference; on CPU "
              "bf16 with --numerics fast where the CPU multiplies bf16 natively (AVX-512 BF16, AMX), else fp32); "
              "losses are summed in fp32; saved tensors keep the checkpoint's dtype")
    add_overwrite(p, what="OUTPUT (and an unfinished work folder)")
    add_quiet(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "awq",
        help="AWQ-quantize the LLM and projector with image+text calibration",
        description="Activation-aware weight quantization (AWQ) of NVILA's LLM and projector. The default "
        "--numerics fast turns on the options that fix the reference's known weaknesses and searches the same "
        "quantities more cheaply; --numerics reference reproduces llm-awq's arithmetic exactly. Each option below "
        "overrides the preset. Calibration runs image + caption conversations through the real NVILA pipeline. "
        "Progress is kept in OUTPUT.work for --resume.",
    )
    quantizer_flags(p)
    p.add_argument("--calib", default="builtin", help="calibration data: builtin (shipped photos + captions), coco "
                   "(COCO captions via datasets; needs the hub), a folder with metadata.jsonl (file_name, text), or "
                   "a .jsonl of {\"image\", \"text\"} / {\"text\"} lines (default: builtin)")
    p.add_argument("--n-samples", type=int, default=_DEFAULTS.n_samples,
                   help=f"calibration conversations (default: {_DEFAULTS.n_samples})")
    p.add_argument("--seqlen", type=int, default=_DEFAULTS.seqlen,
                   help=f"max tokens per conversation, longer ones truncated (default: {_DEFAULTS.seqlen})")
    p.add_argument("--text-ratio", type=float, default=_DEFAULTS.text_ratio,
                   help=f"fraction of text-only samples (default: {_DEFAULTS.text_ratio})")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed, help=f"sampling seed (default: {_DEFAULTS.seed})")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished block")
    opts = p.add_argument_group("numerics: a preset, and the settings it fills (each flag overrides it)")
    opts.add_argument("--numerics", choices=NUMERICS, default="fast",
                      help="fast (default): the four options below on, the coarse-to-fine ratio search, losses on "
                      "a token subset, Gram-matrix losses for single linears, bf16 compute on CPUs with native bf16; "
                      "reference: llm-awq's arithmetic, bit for bit")
    bool_flag = argparse.BooleanOptionalAction

    def preset(name: str) -> str:
        return f"(fast: {PRESETS['fast'][name]}, reference: {PRESETS['reference'][name]})"

    opts.add_argument("--duo-scaling", action=bool_flag, default=None,
                      help=f"scales s = x_mean^r / w_mean^(1-r) instead of x_mean^r (AutoAWQ's option) "
                      f"{preset('duo_scaling')}")
    opts.add_argument("--grid-include-one", action=bool_flag, default=None,
                      help=f"also try ratio 1.0 (the reference stops at 0.95) {preset('grid_include_one')}")
    opts.add_argument("--gqa-vo", action=bool_flag, default=None,
                      help="GQA-aware v_proj -> o_proj scale group (the reference skips it on GQA models like Qwen2) "
                      f"{preset('gqa_vo')}")
    opts.add_argument("--quant-input", action=bool_flag, default=None,
                      help="feed each block the quantized output of the previous one (and the LLM the quantized "
                      f"projector's output) instead of the full-precision output {preset('quant_input')}")
    opts.add_argument("--ratio-search", choices=RATIO_SEARCHES, default=None,
                      help="grid: every scale ratio; coarse: every 4th, then every ratio between the best one's "
                      f"neighbours {preset('ratio_search')}")
    opts.add_argument("--search-tokens", type=int, default=None, metavar="N",
                      help="calibration tokens the scale-search losses use, a seeded random subset; 0 = all (the "
                      f"mean |x| statistics always use all) {preset('search_tokens')}")
    opts.add_argument("--gram-loss", action=bool_flag, default=None,
                      help="the output MSE of a single-linear group (v -> o, up -> down) from its inputs' Gram "
                      f"matrix over every token, where that is cheaper than the forward {preset('gram_loss')}")
    opts.add_argument("--no-clip", action="store_true", help="skip the clip search (the reference runs it)")
    vis = p.add_argument_group("vision tower W8A8 (with --targets ...,vision_tower)")
    vis.add_argument("--vision-tiles", type=int, default=_DEFAULTS.vision_tiles,
                     help="calibration tiles (a seeded subset of the image samples' tiles) the tower's smoothing "
                     f"search and int8 run on (default: {_DEFAULTS.vision_tiles})")
    vis.add_argument("--vision-max-error", type=float, default=_DEFAULTS.vision_max_error,
                     help="a tower linear whose relative output error under W8A8 stays above this is kept float and "
                     f"listed in quant_log.json (default: {_DEFAULTS.vision_max_error})")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace, method: str) -> AWQConfig:
    """The run's settings from the parsed flags (``awq``'s calibration and search flags only for "awq")."""
    extra = {}
    if method == "awq":
        extra = dict(
            n_samples=args.n_samples, seqlen=args.seqlen, text_ratio=args.text_ratio, seed=args.seed,
            numerics=args.numerics, duo_scaling=args.duo_scaling, grid_include_one=args.grid_include_one,
            gqa_vo=args.gqa_vo, quant_input=args.quant_input, ratio_search=args.ratio_search,
            search_tokens=args.search_tokens, gram_loss=args.gram_loss, clip=not args.no_clip,
            vision_tiles=args.vision_tiles, vision_max_error=args.vision_max_error,
        )
    return AWQConfig(
        method=method, bits=args.w_bit, group_size=args.group_size, zero_point=not args.no_zero_point,
        targets=args.targets, format=args.format, device=args.device, dtype=args.dtype,
        quantize_lm_head=args.quantize_lm_head, **extra,
    )


def report(result) -> None:  # noqa: ANN001 (a QuantizeResult)
    """What was written and how AWQ compares with RTN, in a few lines."""
    log = result.log
    summary = log.get("summary", {})
    print(f"wrote {log['method']} checkpoint to {result.output} in {log['timings']['total_s']:.1f} s")
    if summary.get("blocks"):
        print(f"  LLM blocks where AWQ beats RTN (output MSE): {summary['blocks_awq_better']}/{summary['blocks']}")
    if summary.get("vision_tower"):
        v = summary["vision_tower"]
        print(f"  vision tower W8A8: {v['quantized']} linears int8, {v['kept_float']} kept float")
    if summary.get("projector", {}).get("mse_rtn") is not None:
        p = summary["projector"]
        print(f"  projector output MSE: RTN {p['mse_rtn']:.3g}, {log['method']} {p['mse_awq']:.3g}")
    if summary.get("lm_head", {}).get("kl_rtn") is not None:
        h = summary["lm_head"]
        print(f"  int4 lm_head, next-token KL vs the float head on calibration tokens: RTN {h['kl_rtn']:.3g}, "
              f"{log['method']} {h['kl_awq']:.3g}")
    print(f"  log: {result.output / 'quant_log.json'}")
    if log.get("notes"):
        print("  notes:\n    " + "\n    ".join(log["notes"]))


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args, "awq")
    with logging_redirect_tqdm():
        result = quantize(args.model, config, args.calib, args.output, resume=args.resume, overwrite=args.overwrite,
                          progress=not args.quiet, layout=args.layout)
    report(result)
    return 0
