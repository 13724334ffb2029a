"""End-to-end decode speed of a quantized synthetic NVILA vs the same model in bf16 and fp32, same run.

    python benchmarks/decode.py [--decode-tokens 32] [--repeats 3] [--spec cpu|7b-stack] [--format autoawq]

The model is ``make_tiny`` with an LLM whose linears dominate (hidden 2048, intermediate 5632, 4 layers,
16 heads / 4 KV heads); its LLM and projector are RTN-quantized to 4-bit g128 and written in the chosen format,
then the float checkpoint (bf16, fp32) and the quantized one (bf16 activations) are timed with
``NVILAQwen2.benchmark`` on a text prompt, interleaved. On a GPU the comparison is fp16 float vs the quantized
model's CUDA kernels (``--spec 7b-stack``: Qwen2-7B-wide layers), each decoding with one CUDA graph replay per
token by default (``--decode-mode dynamic`` for the eager loop). Writes one result file per run,
benchmarks/results/decode/<time>-<machine>[-<T>thread][-<decode mode>].json, with each timed run's dict from
``NVILAQwen2.benchmark`` (``runs``) next to the medians (``rows``).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_results_arg, interleaved_runs, llm_bytes, table, write_result  # noqa: E402

from nvila_quant.model import NVILAQwen2  # noqa: E402
from nvila_quant.model.lean_decode import LeanDecoder  # noqa: E402
from nvila_quant.model.quantized import quantized_modules  # noqa: E402
from nvila_quant.model.static_decode import DECODE_MODES, decode_settings  # noqa: E402
from nvila_quant.quant.rtn import write_rtn_checkpoint  # noqa: E402
from nvila_quant.testing.factory import TinySpec, make_tiny  # noqa: E402

SPECS = {
    "tiny": TinySpec(seed=0),  # the tests' model: smoke runs only
    "cpu": TinySpec(seed=0, llm_hidden=2048, llm_intermediate=5632, llm_layers=4, llm_heads=16, llm_kv_heads=4),
    "7b-stack": TinySpec(seed=0, llm_hidden=3584, llm_intermediate=18944, llm_layers=4, llm_heads=28, llm_kv_heads=4),
}
PROMPT = ["Write a long story about a cat who travels to the moon and back, with many details."]
GOALS = {"cpu_vs_bf16": 2.5, "gpu_vs_fp16": 2.5}


def _decode_step(model: NVILAQwen2) -> str:
    """How the timed decode steps ran: a CUDA graph replay, a static-cache step (torch.compile-d or eager), the lean
    step, or the dynamic-cache loop."""
    decoder = model.decode_session.static
    if decoder is None:
        return "dynamic"
    if isinstance(decoder, LeanDecoder):
        return "lean"
    step = "cuda-graph" if decoder.graph is not None else "static"
    return step + ("+compiled" if decoder.compiled else "" if decoder.graph is not None else "-eager")


def run(spec_name: str, fmt: str, decode_tokens: int, repeats: int, workdir: Path, skip_bf16: bool = False) -> dict:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    src = make_tiny(workdir / "float", SPECS[spec_name])
    dst = write_rtn_checkpoint(src, workdir / "int4", fmt, bits=4, group_size=128, device=device)
    variants = {  # name -> (folder, dtype)
        "int4": (dst, torch.float16 if cuda else torch.bfloat16),
        "bf16": (src, torch.bfloat16),
        "fp16" if cuda else "fp32": (src, torch.float16 if cuda else torch.float32),
    }
    if skip_bf16 and cuda:  # the GPU comparison is int4 vs fp16; bf16 only adds time (a compile each in compiled mode)
        del variants["bf16"]
    models = {name: NVILAQwen2.load_pretrained(folder, torch_dtype=dtype, device=device)
              for name, (folder, dtype) in variants.items()}
    runs = interleaved_runs(models, PROMPT, decode_tokens, repeats)
    rows = []
    for name, model in models.items():
        tps = statistics.median(r["decode_tokens_per_s"] for r in runs[name])
        rows.append({"model": name, "dtype": str(variants[name][1]).removeprefix("torch."),
                     "decode_tokens_per_s": tps,
                     "prefill_ms": statistics.median(r["prefill_ms"] for r in runs[name]),
                     "llm_weight_MB": llm_bytes(model) / 2**20,
                     "quantized_linears": len(quantized_modules(model)), "decode_step": _decode_step(model)})
    base = {r["model"]: r["decode_tokens_per_s"] for r in rows}
    for r in rows:
        r["x_vs_bf16"] = r["decode_tokens_per_s"] / base["bf16"] if "bf16" in base else None
        r["x_vs_fp32" if not cuda else "x_vs_fp16"] = r["decode_tokens_per_s"] / base["fp16" if cuda else "fp32"]
    del models
    gc.collect()
    sizes = {k: v for k, v in asdict(SPECS[spec_name]).items() if k.startswith("llm_")}
    return {"spec": spec_name, "spec_sizes": sizes, "format": fmt, "device": device, "decode_tokens": decode_tokens,
            "repeats": repeats, "rows": rows, "runs": runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens generated per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model (interleaved; medians)")
    parser.add_argument("--spec", choices=sorted(SPECS), default=None,
                        help="synthetic model size (default: cpu on CPU, 7b-stack on a GPU; tiny: the tests' model, "
                             "for smoke runs)")
    parser.add_argument("--format", default="autoawq", choices=["autoawq", "compressed-tensors", "tinychat"],
                        help="checkpoint format of the quantized model")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's choice)")
    parser.add_argument("--skip-bf16", action="store_true", help="GPU: time int4 and fp16 only")
    parser.add_argument("--decode-mode", choices=DECODE_MODES, default=None,
                        help="decode steps: auto (CUDA graphs on a GPU), graph, static, dynamic (default: "
                             "$NVILA_QUANT_DECODE or auto)")
    add_results_arg(parser)
    args = parser.parse_args(argv)
    if args.decode_mode:
        decode_settings().mode = args.decode_mode
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = args.spec or ("7b-stack" if torch.cuda.is_available() else "cpu")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="nvq-decode-") as tmp, torch.inference_mode():
        result = run(spec, args.format, args.decode_tokens, args.repeats, Path(tmp), args.skip_bf16)
    cols = ["model", "dtype", "decode_step", "decode_tokens_per_s", "prefill_ms", "llm_weight_MB", "quantized_linears",
            "x_vs_bf16",
            "x_vs_fp16" if torch.cuda.is_available() else "x_vs_fp32"]
    print(table(result["rows"], cols))
    int4 = next(r for r in result["rows"] if r["model"] == "int4")
    if torch.cuda.is_available():
        result["goal"] = {"int4_vs_fp16": GOALS["gpu_vs_fp16"], "met": int4["x_vs_fp16"] >= GOALS["gpu_vs_fp16"],
                          "device": torch.cuda.get_device_name(0)}
    else:
        result["goal"] = {"int4_vs_bf16": GOALS["cpu_vs_bf16"], "met": int4["x_vs_bf16"] >= GOALS["cpu_vs_bf16"],
                          "gpu": "not measured: no GPU"}
    result["load_average_start"] = load
    result["threads"] = torch.get_num_threads()
    result["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print("goal:", result["goal"])
    result["decode_mode"] = decode_settings().mode
    variant = "-".join(([f"{args.threads}thread"] if args.threads else []) + ([args.decode_mode] if args.decode_mode
                                                                                else []))
    path = write_result("decode", result, variant or None, "cuda" if torch.cuda.is_available() else "cpu",
                        args.results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
