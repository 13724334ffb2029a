"""Helpers shared by the benchmark scripts: machine description, timing, tables, result files.

Every run writes one JSON file, ``benchmarks/results/<benchmark>/<UTC YYYYmmdd-HHMMSS>-<machine>[-<variant>].json``
(:func:`write_result`), with the commit it ran from, its command line, the machine, the library versions and the
benchmark's own payload under ``"result"`` (every timing sample, not only the summaries). ``--results DIR`` (every
script, :func:`add_results_arg`) or ``$NVILA_QUANT_RESULTS`` write elsewhere (smoke runs). The folder of runs is the
source of truth; ``benchmarks/report.py`` turns it into the README's "Measured here" table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

from nvila_quant.machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parent.parent
RESULTS_ENV = "NVILA_QUANT_RESULTS"
SCHEMA = 1
# the CPU features the int4 kernels dispatch on (as /proc/cpuinfo spells them)
CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
# distributions whose versions each result records (the first installed name of each tuple)
VERSIONS = {"torch": ("torch",), "transformers": ("transformers",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
            "onnx": ("onnx",), "numpy": ("numpy",), "nvila_quant": ("nvila-quant",)}


def machine() -> dict:
    return machine_info()


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def llm_bytes(model) -> int:  # noqa: ANN001 (an NVILAQwen2)
    """Bytes of the loaded LLM's parameters and buffers (packed int4 tensors included)."""
    llm = model.get_llm()
    return sum(t.numel() * t.element_size() for t in [*llm.parameters(), *llm.buffers()])


def interleaved_runs(models: dict, prompt: list, decode_tokens: int, repeats: int) -> dict[str, list[dict]]:
    """``model.benchmark`` of every model, interleaved over ``repeats`` rounds after one short warm-up each (kernel
    repacks, CUDA libraries), so slow drifts of the machine fall on every model alike: {name: [run, ...]}."""
    runs: dict[str, list[dict]] = {name: [] for name in models}
    for model in models.values():
        model.benchmark(prompt, max_new_tokens=4, quiet=True)
    for _ in range(repeats):
        for name, model in models.items():
            runs[name].append(model.benchmark(prompt, max_new_tokens=decode_tokens, warmup=False, quiet=True))
    return runs


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    head = "  ".join(c.ljust(widths[c]) for c in columns)
    lines = [head, "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


# ---- the machine, the code and the libraries a run used -----------------------------------------------------------

def cpu_flags() -> list[str]:
    """Which of :data:`CPU_FLAGS` /proc/cpuinfo lists (empty where there is no /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [f for f in CPU_FLAGS if f in present]
    except OSError:
        pass
    return []


def gpu_info() -> dict | None:
    """Name, memory, driver and CUDA runtime of GPU 0 (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    info = {"name": torch.cuda.get_device_name(0), "memory_mb": props.total_memory // 2**20,
            "capability": f"{props.major}.{props.minor}", "cuda_runtime": torch.version.cuda, "driver": None}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                                 capture_output=True, text=True, timeout=30, check=False).stdout.strip()
            info["driver"] = out.splitlines()[0].strip() if out else None
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def machine_record() -> dict:
    """:func:`nvila_quant.machine.machine_info` plus the kernels' CPU flags, usable CPUs and the GPU's details."""
    info = machine_info()
    info["cpu_flags"] = cpu_flags()
    info["cpus_usable"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = gpu_info()
    if gpu is not None:
        info["gpu"] = gpu["name"]  # the name, as machine_info gives it
        info["gpu_details"] = gpu
    return info


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for key, names in VERSIONS.items():
        out[key] = None
        for name in names:
            try:
                out[key] = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
    out["torch"] = torch.__version__  # the imported build (e.g. "+cpu", "+cu130")
    return out


def git_state(repo: Path = REPO) -> dict:
    """``{"commit": HEAD or None, "dirty": bool or None, "dirty_paths": [...]}`` of the checkout at ``repo``; result
    files under benchmarks/results/ do not make it dirty (earlier runs would)."""
    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60,
                                 check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout if res.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    paths = [line[3:] for line in (status or "").splitlines() if line.strip()]
    return {"commit": head.strip() if head else None, "dirty": None if status is None else bool(paths),
            "dirty_paths": paths[:50]}


def slug(text: str, words: int = 4) -> str:
    """A short lowercase file-name part of a CPU or GPU model: "AMD EPYC 9R14 96-Core Processor" -> "amd-epyc-9r14",
    "Intel(R) Xeon(R) Platinum 8580" -> "intel-xeon-platinum-8580", "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3".
    """
    text = re.sub(r"\((r|tm)\)|@.*$|\bcpu\b|\bprocessor\b|\b\d+-core\b", " ", text.lower())
    parts = re.sub(r"[^a-z0-9]+", " ", text).split()
    return "-".join(parts[:words]) or "unknown"


# ---- result files ---------------------------------------------------------------------------------------------------

def add_results_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=None,
                        help=f"root folder of the result files (default: ${RESULTS_ENV} or benchmarks/results); "
                             "the run goes to <root>/<benchmark>/<UTC time>-<machine>[-<variant>].json")


def results_root(root: str | os.PathLike | None = None) -> Path:
    if root:
        return Path(root)
    return Path(os.environ[RESULTS_ENV]) if os.environ.get(RESULTS_ENV) else RESULTS


def write_result(benchmark: str, payload: dict, variant: str | None = None, device: str = "cpu",
                 root: str | os.PathLike | None = None) -> Path:
    """Write one run: ``<root>/<benchmark>/<UTC YYYYmmdd-HHMMSS>-<machine slug>[-<variant>].json``.

    ``device``: "cuda" names the file after the GPU, "cpu" after the CPU model. ``variant``: what the script used to
    put in its file name (thread count, clock, decode mode, ...); None for the default run. The payload goes under
    ``"result"`` unchanged."""
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    info = machine_record()
    name = info["gpu"] if device.startswith("cuda") and "gpu" in info else info["cpu"]
    stem = f"{now:%Y%m%d-%H%M%S}-{slug(name)}" + (f"-{slug(variant, 8)}" if variant else "")
    folder = results_root(root) / benchmark
    folder.mkdir(parents=True, exist_ok=True)
    path, n = folder / f"{stem}.json", 2
    while path.exists():  # two runs in one second
        path, n = folder / f"{stem}-{n}.json", n + 1
    record = {"schema": SCHEMA, "benchmark": benchmark, "variant": variant or None,
              "date": now.isoformat().replace("+00:00", "Z"), **git_state(), "argv": list(sys.argv),
              "device": "cuda" if device.startswith("cuda") else "cpu", "machine": info, "versions": versions(),
              "result": payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(dumps(record) + "\n")
    tmp.replace(path)
    return path


_NUMBERS = re.compile(r"\[\n\s*(-?[0-9][-+0-9.eE]*(?:,\n\s*-?[0-9][-+0-9.eE]*)*)\n\s*\]")


def dumps(record: dict) -> str:
    """Indented JSON with each list of numbers (the timing samples) on one line."""
    text = json.dumps(record, indent=1, default=_json_default)
    return _NUMBERS.sub(lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", text)


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
