"""The end-to-end demo behind ``nvila-quant demo`` (the README's main command).

make a tiny NVILA with outlier channels -> RTN and AWQ with the built-in calibration set -> ONNX export of
the vision side -> reload everything -> comparison report. Offline, a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from nvila_quant.errors import NVILAError
from nvila_quant.export import ExportOptions, export_onnx
from nvila_quant.io import check_output_dir
from nvila_quant.model import Image, NVILAQwen2
from nvila_quant.model.summary import describe_checkpoint, format_description
from nvila_quant.paths import builtin_calib_dir
from nvila_quant.quant.config import AWQConfig
from nvila_quant.quant.runner import quantize
from nvila_quant.report.compare import CompareConfig, compare
from nvila_quant.testing.factory import TinySpec, make_tiny

__all__ = ["DemoSettings", "run_demo"]

PROMPT = "Describe the image."


@dataclass
class DemoSettings:
    """Sizes that keep the demo within a few minutes on 2 cores (tests shrink them further)."""

    n_samples: int = 8  # AWQ calibration conversations
    seqlen: int = 4096  # tokens kept per conversation
    eval_generations: int = 2  # greedy generations shown in the report
    repeats: int = 3  # timed runs per model
    decode_tokens: int = 16  # tokens decoded per timed run
    speed: bool = True  # measure speed and memory
    device: str = "cpu"


def _step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def _done(t0: float) -> None:
    print(f"    ({time.perf_counter() - t0:.1f} s)", flush=True)


def run_demo(workdir: str | os.PathLike, overwrite: bool = False, settings: DemoSettings | None = None) -> dict:
    """Run the whole pipeline in ``workdir``; returns the comparison report (also in workdir/report/)."""
    s = settings or DemoSettings()
    workdir = check_output_dir(workdir, overwrite)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    timings: dict[str, float] = {}

    t = _step("1/6 make a tiny synthetic NVILA with planted activation-outlier channels")
    float_dir = make_tiny(workdir / "nvila-tiny", TinySpec(variant="nvila", seed=0, outliers=True))
    print(format_description(describe_checkpoint(float_dir)))
    timings["make_tiny_s"] = time.perf_counter() - t
    _done(t)

    common = {"bits": 4, "group_size": 128, "format": "autoawq", "device": s.device}
    t = _step("2/6 round-to-nearest int4 (RTN, the baseline), LLM + projector, AutoAWQ GEMM format")
    rtn_dir = quantize(float_dir, AWQConfig(method="rtn", **common), None, workdir / "nvila-tiny-rtn-w4g128",
                       progress=False).output
    timings["rtn_s"] = time.perf_counter() - t
    _done(t)

    t = _step(f"3/6 AWQ int4 calibrated on {s.n_samples} built-in image+caption conversations (reference numerics)")
    awq_dir = quantize(float_dir, AWQConfig(method="awq", n_samples=s.n_samples, seqlen=s.seqlen, **common),
                       "builtin", workdir / "nvila-tiny-awq-w4g128").output
    timings["awq_s"] = time.perf_counter() - t
    _done(t)

    t = _step("4/6 export the vision tower, S2 stage and projector to ONNX and verify with onnxruntime")
    onnx_dir = workdir / "onnx"
    manifest = export_onnx(float_dir, onnx_dir, ExportOptions(include_projector=True), progress=False)
    worst = _worst_verification(manifest)
    print(f"    wrote {onnx_dir}; worst relative error onnxruntime vs PyTorch: {worst:.2e}")
    timings["onnx_s"] = time.perf_counter() - t
    _done(t)

    t = _step("5/6 reload the AWQ checkpoint (packed int4 kernels) and the ONNX vision backend; answer a prompt")
    image = Image(builtin_calib_dir() / "astronaut.jpg")
    greedy = GenerationConfig(do_sample=False, max_new_tokens=12)
    quantized = NVILAQwen2.load_pretrained(awq_dir, device=s.device)
    print("    int4 answer (synthetic model, expect noise): ", end="", flush=True)
    for piece in quantized.stream_content([image, PROMPT], greedy):
        print(piece, end="", flush=True)
    print()
    del quantized
    onnx_model = NVILAQwen2.load_pretrained(float_dir, torch_dtype=torch.float32, device=s.device,
                                            vision_backend="onnx", onnx_dir=onnx_dir)
    torch_model = NVILAQwen2.load_pretrained(float_dir, torch_dtype=torch.float32, device=s.device)
    same = onnx_model.generate_content([image, PROMPT], greedy) == torch_model.generate_content([image, PROMPT], greedy)
    print(f"    ONNX vision backend gives the same greedy answer as PyTorch: {same}")
    del onnx_model, torch_model
    timings["reload_s"] = time.perf_counter() - t
    _done(t)

    t = _step("6/6 compare RTN and AWQ with the float model on held-out data (accuracy, speed, size)")
    report = compare(
        float_dir, [rtn_dir, awq_dir], workdir / "report",
        CompareConfig(device=s.device, n_generate=s.eval_generations, speed=s.speed, repeats=s.repeats,
                      decode_tokens=s.decode_tokens, html=True),
        onnx_dir=onnx_dir,
    )
    timings["compare_s"] = time.perf_counter() - t
    _done(t)

    print("\n" + _summary(report))
    (workdir / "demo.json").write_text(json.dumps({"timings": timings, "onnx_same_generation": same,
                                                   "onnx_worst_relative_error": worst}, indent=2) + "\n")
    print(f"\nreport: {(workdir / 'report' / 'report.md').absolute()} (and report.html, report.json)")
    print("The demo model is synthetic (random weights with planted outlier channels): its answers are noise and "
          "its speeds are a toy's. What carries over is the relative picture: AWQ keeps outlier channels that "
          "round-to-nearest loses. For real numbers, run the same commands on a real NVILA checkpoint.")
    return report


def _worst_verification(manifest: dict) -> float:
    """Largest relative error (max|ort - torch| / max|torch|) over the verified outputs; an export without
    verification results is an error (the demo always verifies)."""
    worst = (manifest.get("verification") or {}).get("worst") or {}
    if not worst:
        raise NVILAError("the ONNX export carries no verification results; the demo exports with verification on")
    return max(w["rel"] for w in worst.values())


def _summary(report: dict) -> str:
    lines = [f"{'candidate':<28} {'mean KL':>9} {'argmax agree':>13} {'size ratio':>11} {'decode ratio':>13}"]
    for c in report["candidates"]:
        a = c["accuracy"]
        dec = (c.get("speed_ratio") or {}).get("decode_tokens_per_s")
        lines.append(f"{c['name']:<28} {a['kl_mean']:>9.4g} {a['top1_agreement']:>13.4g} "
                     f"{c['size_ratio']['total_mb']:>11.3g} {dec if dec is not None else 'n/a':>13}")
    return "\n".join(lines)
