"""``nvila-quant compare``: accuracy, speed and size of quantized candidates against the float reference.

Every number is computed on the same inputs for every model, on the same machine in the same run.
Numbers are rounded to 4 significant digits once, then written to both ``report.json`` and
``report.md`` (so every number in the Markdown is in the JSON).
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nvila_quant.errors import CheckpointError, ConfigError, NVILAError
from nvila_quant.eval.runner import EvalConfig, model_names, run_benchmark
from nvila_quant.formats.checkpoint import detect_format, spec_from_config
from nvila_quant.io import atomic_output_dir, check_output_dir, read_json
from nvila_quant.machine import machine_info
from nvila_quant.model import NVILAQwen2
from nvila_quant.model.config import NVILAConfig
from nvila_quant.model.summary import describe_checkpoint
from nvila_quant.model.tokenizer import load_tokenizer
from nvila_quant.numerics.metrics import cosine, max_abs
from nvila_quant.quant.head import head_rows
from nvila_quant.report import plots
from nvila_quant.report.accuracy import ModelOutputs, compare_outputs, run_model, visual_tokens
from nvila_quant.report.benchmark import benchmark_blocks, copy_model_folders, work_dir_for
from nvila_quant.report.document import render_html, render_markdown, round_numbers
from nvila_quant.report.evalset import load_eval_set
from nvila_quant.report.speed import measure_in_subprocess

__all__ = ["CompareConfig", "check_compatible", "compare", "round_numbers"]


@dataclass
class CompareConfig:
    """Settings of a comparison run.

    Args:
        device: "cpu" or "cuda[:N]" (default: cuda when present).
        dtype: activation/float dtype for every model (default: bf16 on CPU, fp16 on CUDA).
        n_generate: prompts whose greedy generations are shown side by side.
        speed: measure speed and memory (each model in its own process).
        tasks: benchmark tasks run through lmms-eval on every model (``nvila-quant eval``'s; none by default), from
            lmms-eval or from the task folders ``tasks_paths``, ``limit`` documents each.
        cpu_activations: "int8": each candidate also runs with one int8 per activation element in the CPU int4 kernels
            (``NVILA_QUANT_CPU_ACTIVATIONS=int8``), as an extra row "<name> (int8 activations)": its accuracy with
            every T16 kernel call's activations quantized (prefill included, so each answer position sees what a
            decode step with int8 activations computes), its speed with the setting as deployed.
    """

    eval_data: str = "builtin"
    device: str | None = None
    dtype: str | None = None
    n_generate: int = 3
    max_new_tokens: int = 24
    speed: bool = True
    repeats: int = 3
    decode_tokens: int = 16
    html: bool = False
    overwrite: bool = False
    tasks: list[str] = field(default_factory=list)
    tasks_paths: list[str] = field(default_factory=list)
    limit: int | None = None
    cpu_activations: str | None = None

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype is None:
            self.dtype = "fp16" if self.device.startswith("cuda") else "bf16"
        if self.repeats < 1 or self.decode_tokens < 2:
            raise NVILAError(f"need repeats >= 1 and decode_tokens >= 2 (got {self.repeats}, {self.decode_tokens})")
        if self.cpu_activations not in (None, "exact", "int8"):
            raise NVILAError(f"cpu_activations must be 'exact' or 'int8', got {self.cpu_activations!r}")
        if self.cpu_activations == "int8":
            from nvila_quant.kernels.cpu import native

            if self.device != "cpu":
                raise NVILAError(f"int8 activations are a CPU kernel mode: compare on --device cpu (got {self.device})")
            if not native.native_caps() & native.CAP_VNNI:
                raise NVILAError("int8 activations need the native CPU kernels with AVX-512 VNNI, which this machine "
                                 f"lacks ({native.unavailable_reason() or 'no AVX-512 VNNI'})")


def _llm_geometry(path: Path) -> dict:
    """Sizes that must agree between reference and candidate. The vocabulary is the runtime's: the
    stored embedding rows, grown to the tokenizer once the media tokens are added."""
    config = NVILAConfig.from_pretrained(path)
    part = config.part("llm")
    llm = part.read_config()
    tokens = len(load_tokenizer(part.folder))
    vocab = max(int(llm.get("vocab_size") or 0), tokens)
    return {"vocab_size": vocab, "tokens": tokens, "hidden_size": llm.get("hidden_size"),
            "mm_hidden_size": config.mm_hidden_size, "num_hidden_layers": llm.get("num_hidden_layers")}


def check_compatible(reference: Path, candidate: Path) -> None:
    """Refuse a candidate whose vocabulary or sizes differ from the reference (before loading weights). An int4
    lm_head's vocabulary is the reference's padded to a multiple of 64 (:func:`nvila_quant.quant.head.head_rows`;
    the padding rows are tokens the reference gives probability 0), with the same tokenizer."""
    ref, cand = _llm_geometry(reference), _llm_geometry(candidate)
    if cand["vocab_size"] == head_rows(ref["vocab_size"], 0) and cand["tokens"] == ref["tokens"]:
        cand["vocab_size"] = ref["vocab_size"]
    for key in ("vocab_size", "hidden_size", "mm_hidden_size", "num_hidden_layers"):
        if ref[key] != cand[key]:
            raise CheckpointError(
                f"candidate {candidate} does not match reference {reference}: {key} is {cand[key]} vs {ref[key]} "
                "(compare a quantized model only with the float model it came from)"
            )


def _quantization(path: Path) -> dict:
    """Method and settings of a candidate, from its quant_log.json and quantization_config; ``lm_head``: whether its
    output head is int4 (from the packed modules the LLM config lists)."""
    info: dict[str, Any] = {"method": "float", "lm_head": False}
    llm_cfg = NVILAConfig.from_pretrained(path).part("llm").read_config()
    qc = llm_cfg.get("quantization_config")
    if qc:
        info.update({"method": qc.get("quant_method"), "bits": qc.get("bits", qc.get("w_bit")),
                     "group_size": qc.get("group_size", qc.get("q_group_size"))})
        try:
            spec = spec_from_config(llm_cfg) if detect_format(llm_cfg) else None
        except (ConfigError, CheckpointError):
            spec = None
        modules = spec.quantized_modules if spec is not None else None
        info["lm_head"] = "lm_head" in modules if modules else bool(qc.get("lm_head", False))
    log = path / "quant_log.json"
    if log.is_file():
        settings = read_json(log).get("settings", read_json(log).get("config", {}))
        info["method"] = settings.get("method", info["method"])
        for key in ("bits", "w_bit", "group_size", "format", "zero_point", "targets"):
            if key in settings:
                info[key.replace("w_bit", "bits")] = settings[key]
    return info


def _layer_losses(path: Path) -> list[dict]:
    """Per-block, per-group RTN-vs-AWQ output losses from quant_log.json (empty when absent)."""
    log_path = path / "quant_log.json"
    if not log_path.is_file():
        return []
    log = read_json(log_path)
    rows = []
    for block in log.get("blocks", []):
        name = str(block.get("name", block.get("block", block.get("index", len(rows)))))
        groups = block.get("groups", {})
        items = (groups.items() if isinstance(groups, dict)
                 else ((g.get("name", str(i)), g) for i, g in enumerate(groups)))
        for group, g in items:
            rtn = g.get("rtn_loss", g.get("rtn"))
            awq = g.get("awq_loss", g.get("awq", g.get("loss")))
            if rtn is not None and awq is not None:
                rows.append({"block": name, "group": str(group), "rtn": float(rtn), "awq": float(awq)})
    return rows


def _head_losses(path: Path) -> dict | None:
    """The int4 lm_head's errors against the float head on the calibration tokens, from quant_log.json (None when
    the head is float or there is no log): next-token KL and logit MSE of round to nearest and of the result."""
    log_path = path / "quant_log.json"
    head = read_json(log_path).get("lm_head") if log_path.is_file() else None
    if not head or head.get("kl_rtn") is None:
        return None
    return {k: head.get(k) for k in ("tokens", "kl_rtn", "kl_awq", "mse_rtn", "mse_awq")}


def _sizes(path: Path) -> dict:
    d = describe_checkpoint(path)
    out = {f"{k}_mb": v["bytes"] / 2**20 for k, v in d["submodels"].items()}
    out["total_mb"] = d["total_bytes"] / 2**20
    return out


def _load(path: Path, cfg: CompareConfig, **kwargs):
    return NVILAQwen2.load_pretrained(path, torch_dtype=cfg.dtype, device=cfg.device, **kwargs)


INT8_ACTIVATIONS = "int8 activations"  # the extra rows' suffix and their quantization["activations"]


def _int8_activations():
    """Every T16 kernel call with one int8 per activation element (prefill too: the answer logits come from one
    forward over the whole conversation)."""
    from nvila_quant.kernels.cpu.settings import cpu_settings
    from nvila_quant.settings import overrides

    # (dense_min_tokens: where a CPU hands long prefills to dequantize + dense matmul - AMX-class CPUs whose OS refuses
    # AMX - the T16 kernels keep them)
    return overrides(cpu_settings(), activations="int8", int8_max_tokens=1 << 40, dense_min_tokens=1 << 40)


def _free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _onnx_check(onnx_dir: Path, reference: Path, ref_out: ModelOutputs, evalset, cfg: CompareConfig) -> dict:
    """Visual tokens through the onnxruntime vision backend vs the reference's PyTorch ones."""
    export = read_json(onnx_dir / "export.json")
    source = Path(export.get("source_checkpoint") or export.get("source", {}).get("path") or reference)
    if not source.is_dir():
        source = reference
    model = _load(source, cfg, vision_backend="onnx", onnx_dir=str(onnx_dir))
    cos, mabs = [], []
    for sample, ref_tokens in zip(evalset.conversations, ref_out.visual_tokens, strict=True):
        tokens = visual_tokens(model, sample.image)
        cos.append(cosine(ref_tokens, tokens))
        mabs.append(max_abs(ref_tokens, tokens))
    _free(model)
    return {"dir": str(onnx_dir), "source": str(source), "visual_cosine": min(cos) if cos else None,
            "visual_max_abs": max(mabs) if mabs else None}


def compare(
    reference: str | os.PathLike,
    candidates: list[str | os.PathLike],
    output: str | os.PathLike,
    config: CompareConfig | None = None,
    onnx_dir: str | os.PathLike | None = None,
) -> dict:
    """Compare each candidate with the reference; write report.md/json/png (and .html) to ``output``."""
    cfg = config or CompareConfig()
    reference = Path(reference)
    cands = [Path(c) for c in candidates]
    check_output_dir(output, cfg.overwrite)
    if not cands:
        raise NVILAError("give at least one --candidate")
    for c in cands:
        check_compatible(reference, c)
    evalset = load_eval_set(cfg.eval_data)
    names = model_names(cands)
    bench = None
    if cfg.tasks:  # first: its tasks are checked (offline, names) before any model is loaded
        bench_cfg = EvalConfig(cfg.tasks, cfg.tasks_paths, cfg.limit, device=cfg.device, dtype=cfg.dtype)
        old = Path(output) / "benchmark" / "models"
        bench = run_benchmark([reference, *cands], bench_cfg, work_dir_for(output), reuse=[old] if old.is_dir() else [],
                              names=["reference", *names])

    model = _load(reference, cfg)
    ref_out = run_model(model, evalset, cfg.n_generate, cfg.max_new_tokens, desc="reference")
    ref_vocab = len(model.tokenizer)
    _free(model)
    results = []
    for name, path in zip(names, cands, strict=True):
        model = _load(path, cfg)
        if len(model.tokenizer) != ref_vocab:
            raise CheckpointError(f"candidate {path} has {len(model.tokenizer)} tokens, the reference {ref_vocab}")
        out = run_model(model, evalset, cfg.n_generate, cfg.max_new_tokens, desc=name)
        out8 = None
        if cfg.cpu_activations == "int8":
            with _int8_activations():
                out8 = run_model(model, evalset, cfg.n_generate, cfg.max_new_tokens, desc=f"{name} int8")
        _free(model)
        results.append({"name": name, "path": str(path.absolute()), "quantization": _quantization(path),
                        "accuracy": compare_outputs(ref_out, out), "layer_losses": _layer_losses(path),
                        "lm_head": _head_losses(path)})
        if out8 is not None:  # the same checkpoint, int8 activations: a row of its own (no repeated loss plots)
            results.append({"name": f"{name} ({INT8_ACTIVATIONS})", "path": str(path.absolute()),
                            "quantization": {**_quantization(path), "activations": "int8"},
                            "accuracy": compare_outputs(ref_out, out8), "layer_losses": [], "lm_head": None})
    cands = [Path(r["path"]) for r in results]  # (each int8 row after its candidate's)
    onnx = _onnx_check(Path(onnx_dir), reference, ref_out, evalset, cfg) if onnx_dir else None

    ref_size = _sizes(reference)
    for r, path in zip(results, cands, strict=True):
        r["size"] = _sizes(path)
        r["size_ratio"] = {k: r["size"][k] / ref_size[k] if ref_size[k] else None for k in ref_size}

    report: dict[str, Any] = {
        "generated": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(cfg.device),
        "settings": {"device": cfg.device, "dtype": cfg.dtype, "eval_data": evalset.source,
                     "conversations": len(evalset.conversations), "texts": len(evalset.texts),
                     "repeats": cfg.repeats, "decode_tokens": cfg.decode_tokens,
                     "cpu_activations": cfg.cpu_activations or "exact"},
        "reference": {"name": "reference", "path": str(reference.absolute()), "size": ref_size},
        "candidates": results,
        "onnx": onnx,
    }
    if bench is not None:
        report["benchmark"] = bench[0]
    with atomic_output_dir(output, overwrite=cfg.overwrite) as tmp:
        if cfg.speed and evalset.conversations:
            image = evalset.conversations[0].image
            kw = {"device": cfg.device, "dtype": cfg.dtype, "repeats": cfg.repeats, "decode_tokens": cfg.decode_tokens}
            report["reference"]["speed"] = measure_in_subprocess(str(reference), str(image), tmp / "speed_ref.json",
                                                                 **kw)
            for i, (r, path) in enumerate(zip(results, cands, strict=True)):
                env = {"NVILA_QUANT_CPU_ACTIVATIONS": "int8"} if r["quantization"].get("activations") else None
                r["speed"] = measure_in_subprocess(str(path), str(image), tmp / f"speed_{i}.json", env=env, **kw)
                r["speed_ratio"] = _speed_ratios(r["speed"], report["reference"]["speed"])
            for f in tmp.glob("speed_*.json"):
                f.unlink()
        if bench is not None:
            copy_model_folders(bench[1], tmp / "benchmark" / "models")
        report = round_numbers(report)
        blocks = _document(report, tmp)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "report.md").write_text(render_markdown(blocks))
        if cfg.html:
            (tmp / "report.html").write_text(render_html(blocks, "nvila-quant comparison report"))
    if bench is not None:
        shutil.rmtree(work_dir_for(output), ignore_errors=True)
    return report


def _speed_ratios(cand: dict, ref: dict) -> dict:
    def ratio(key: str) -> float | None:
        a, b = cand.get(key), ref.get(key)
        return a / b if a is not None and b else None

    return {"vision_encode_ms": ratio("vision_encode_ms"), "ttft_ms": ratio("ttft_ms"),
            "decode_tokens_per_s": ratio("decode_tokens_per_s"), "peak_rss_mb": ratio("peak_rss_mb"),
            "peak_cuda_mb": ratio("peak_cuda_mb")}


# ---------------------------------------------------------------------------- the document
def _f(x: Any) -> str:
    """Display form of an (already rounded) number."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return str(x)


def _document(report: dict, folder: Path) -> list[tuple]:
    s, m = report["settings"], report["machine"]
    cands = report["candidates"]
    names = [c["name"] for c in cands]
    machine = m.get("gpu") or m.get("cpu") or m["platform"]
    blocks: list[tuple] = [
        ("h1", "NVILA quantization report"),
        ("p", f"Reference `{report['reference']['path']}`, generated `{report['generated']}` on `{machine}` "
              f"(`{m['platform']}`, torch `{m['torch']}`). Device `{s['device']}`, dtype `{s['dtype']}`. "
              f"Evaluation data `{s['eval_data']}`: {_f(s['conversations'])} image+caption conversations and "
              f"{_f(s['texts'])} text passages, none used for calibration."),
        ("h2", "Accuracy against the reference"),
        ("p", "KL is the mean KL divergence (nats) of next-token distributions over the answer tokens of the "
              "conversations; agreement is the share of those positions where both models' argmax agree; "
              "perplexities are of the reference captions and of the held-out text."
              + (" Candidates marked \"int4 lm_head\" also quantize the output head (`--quantize-lm-head`): their "
                 "KL includes its cost (the padding rows of their vocabulary, tokens the reference never predicts, "
                 "count through the normalization only)." if any(c["quantization"].get("lm_head") for c in cands)
                 else "")
              + (f" Rows marked \"{INT8_ACTIVATIONS}\" are the candidate above them with one int8 per activation "
                 "element in the CPU int4 kernels (`NVILA_QUANT_CPU_ACTIVATIONS=int8`, scale `max|x| / 127` per "
                 "`64` elements: the peers' kind of accuracy, as llama.cpp's Q8_0 activations), on every call here, "
                 "prefill included; their speed is measured with the setting as deployed (few-token calls)."
                 if any(c["quantization"].get("activations") for c in cands) else "")),
        ("table",
         ["candidate", "method", "mean KL", "max KL", "argmax agreement", "answer ppl", "answer ppl (ref)",
          "text ppl", "text ppl (ref)", "visual cosine (min)", "visual max-abs"],
         [[c["name"], _method(c["quantization"]), _f(c["accuracy"]["kl_mean"]), _f(c["accuracy"]["kl_max"]),
           _f(c["accuracy"]["top1_agreement"]), _f(c["accuracy"]["answer_ppl"]),
           _f(c["accuracy"]["answer_ppl_reference"]), _f(c["accuracy"]["text_ppl"]),
           _f(c["accuracy"]["text_ppl_reference"]), _f(c["accuracy"]["visual_cosine"]),
           _f(c["accuracy"]["visual_max_abs"])] for c in cands]),
    ]
    if cands:
        blocks.append(("img", str(plots.plot_accuracy(
            names, [c["accuracy"]["kl_mean"] for c in cands], [c["accuracy"]["top1_agreement"] for c in cands],
            folder / "accuracy.png")), "accuracy"))
    heads = [c for c in cands if c.get("lm_head")]
    if heads:
        blocks += [("h2", "Int4 output head"),
                   ("p", "The int4 lm_head against the float head alone, on the candidate's calibration tokens (from "
                         "its `quant_log.json`): next-token KL (nats) and logit MSE of round to nearest and of the "
                         "written head (AWQ: scales folded into the final norm, clipped)."),
                   ("table", ["candidate", "tokens", "KL RTN", "KL written", "MSE RTN", "MSE written"],
                    [[c["name"], _f(c["lm_head"]["tokens"]), _f(c["lm_head"]["kl_rtn"]), _f(c["lm_head"]["kl_awq"]),
                      _f(c["lm_head"]["mse_rtn"]), _f(c["lm_head"]["mse_awq"])] for c in heads])]
    if report.get("onnx"):
        o = report["onnx"]
        blocks += [("h2", "ONNX vision backend"),
                   ("p", f"Visual tokens from onnxruntime (export `{o['dir']}`, source `{o['source']}`) against the "
                         f"reference's PyTorch ones: cosine (min over images) {_f(o['visual_cosine'])}, max-abs "
                         f"{_f(o['visual_max_abs'])}.")]
    blocks.append(("h2", "Greedy generations"))
    for c in cands:
        rows = [[_f(g["prompt"]), g["reference"] or "(empty)", g["candidate"] or "(empty)",
                 "identical" if g["identical"] else _f(g["first_divergence"])] for g in c["accuracy"]["generations"]]
        blocks += [("p", f"`{c['name']}` (prompt: an evaluation image and \"Describe the image.\")"),
                   ("table", ["prompt", "reference", "candidate", "first divergence (token)"], rows)]
    blocks.append(("h2", "Size on disk"))
    ref_size = report["reference"]["size"]
    size_rows = [["reference", _f(ref_size["llm_mb"]), _f(ref_size["vision_tower_mb"]),
                  _f(ref_size["mm_projector_mb"]), _f(ref_size["total_mb"]), "baseline"]]
    for c in cands:
        size_rows.append([c["name"], _f(c["size"]["llm_mb"]), _f(c["size"]["vision_tower_mb"]),
                          _f(c["size"]["mm_projector_mb"]), _f(c["size"]["total_mb"]), _f(c["size_ratio"]["total_mb"])])
    blocks.append(("table", ["model", "llm MB", "vision_tower MB", "mm_projector MB", "total MB", "total ratio"],
                   size_rows))
    ref_speed = report["reference"].get("speed")
    if ref_speed:
        blocks += [("h2", "Speed and memory"),
                   ("p", f"Medians of {_f(s['repeats'])} runs after a warm-up, each model in its own process on the "
                         f"same machine; {_f(s['decode_tokens'])} tokens decoded per run. Ratios are "
                         "candidate / reference.")]
        rows = [["reference", _f(ref_speed["vision_encode_ms"]), _f(ref_speed["ttft_ms"]),
                 _f(ref_speed["decode_tokens_per_s"]), _f(ref_speed["peak_rss_mb"]), _f(ref_speed.get("peak_cuda_mb")),
                 "", "", ""]]
        for c in cands:
            sp, r = c["speed"], c["speed_ratio"]
            rows.append([c["name"], _f(sp["vision_encode_ms"]), _f(sp["ttft_ms"]), _f(sp["decode_tokens_per_s"]),
                         _f(sp["peak_rss_mb"]), _f(sp.get("peak_cuda_mb")), _f(r["ttft_ms"]),
                         _f(r["decode_tokens_per_s"]), _f(r["peak_rss_mb"])])
        blocks.append(("table", ["model", "vision encode ms/image", "TTFT ms", "decode tok/s", "peak RSS MB",
                                 "peak GPU MB", "TTFT ratio", "decode ratio", "RSS ratio"], rows))
        if cands:
            blocks.append(("img", str(plots.plot_ratios(names, {
                "decode tok/s": [c["speed_ratio"]["decode_tokens_per_s"] for c in cands],
                "TTFT": [c["speed_ratio"]["ttft_ms"] for c in cands],
                "size": [c["size_ratio"]["total_mb"] for c in cands],
            }, folder / "speed.png", "candidate / reference")), "speed and size ratios"))
    for c in cands:
        if c["layer_losses"]:
            path = plots.plot_layer_losses(c["layer_losses"], folder / f"layers_{_slug(c['name'])}.png",
                                           f"{c['name']}: per-block output error, RTN vs AWQ")
            blocks += [("h2", f"Per-layer losses: {c['name']}"),
                       ("p", "Output MSE of each scale group on the calibration data, round-to-nearest vs AWQ "
                             "(from the candidate's `quant_log.json`)."),
                       ("img", str(path), "per-layer losses")]
    if report.get("benchmark"):
        blocks += benchmark_blocks(report["benchmark"])
    return blocks


def _method(q: dict) -> str:
    if q.get("method") in (None, "float"):
        return "float"
    parts = [str(q.get("method"))]
    if q.get("bits") is not None:
        parts.append(f"w{q['bits']}")
    if q.get("group_size") is not None:
        parts.append(f"g{q['group_size']}")
    if q.get("lm_head"):
        parts.append("+ int4 lm_head")
    if q.get("activations"):
        parts.append(f"+ {q['activations']} activations")
    return " ".join(parts)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
