"""Benchmark tables: ``nvila-quant eval`` (results.md/json/html) and the benchmark section of ``compare``'s report.

Scores come from :func:`nvila_quant.eval.runner.run_benchmark` (lmms-eval's metrics, one model after another); this
module writes them. Each model's folder (``result.json``, ``samples/<task>.jsonl``, ``harness.log``) is copied into the
output under ``models/<name>/``, where a later run with ``--overwrite`` finds and reuses it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nvila_quant.eval.runner import EvalConfig, ModelResult, run_benchmark
from nvila_quant.io import atomic_output_dir, check_output_dir
from nvila_quant.machine import machine_info
from nvila_quant.report.document import Block, render_html, render_markdown, round_numbers

__all__ = ["benchmark_blocks", "copy_model_folders", "evaluate", "work_dir_for"]


def work_dir_for(output: str | os.PathLike) -> Path:
    """``<output>.work``: finished models of an interrupted run (kept when a run fails; removed after success)."""
    output = Path(output).absolute()
    return output.with_name(output.name + ".work")


def copy_model_folders(models: Sequence[ModelResult], dest: Path) -> None:
    """Each model's result folder as ``dest/<name>/``."""
    dest.mkdir(parents=True, exist_ok=True)
    for m in models:
        shutil.copytree(m.folder, dest / m.name)


def evaluate(
    models: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    config: EvalConfig,
    html: bool = False,
    overwrite: bool = False,
) -> dict:
    """Benchmark each model (the first is the reference of the deltas); write ``output`` with results.json,
    results.md (and results.html) and models/. Models whose results are in ``output`` (with ``overwrite``) or in
    ``<output>.work`` (an interrupted run) under the same cache key are not evaluated again."""
    output = check_output_dir(output, overwrite)
    work = work_dir_for(output)
    reuse = [output / "models"] if output.is_dir() else []
    summary, results = run_benchmark(models, config, work, reuse=reuse)
    report = round_numbers({"generated": dt.datetime.now().isoformat(timespec="seconds"),
                            "machine": machine_info(config.device), **summary})
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        copy_model_folders(results, tmp / "models")
        blocks = [("h1", "NVILA benchmark accuracy"), *benchmark_blocks(report, heading=None)]
        (tmp / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "results.md").write_text(render_markdown(blocks))
        if html:
            (tmp / "results.html").write_text(render_html(blocks, "nvila-quant benchmark accuracy"))
    shutil.rmtree(work, ignore_errors=True)
    return report


def _n(x: Any) -> str:
    """Display form of an (already rounded) number."""
    if x is None:
        return "n/a"
    return str(int(x)) if isinstance(x, float) and x.is_integer() else f"{x:g}" if isinstance(x, float) else str(x)


def _text(x: Any) -> str:
    """A text cell: inline code (so numbers inside answers are not read as report numbers), one line."""
    s = str(x if not isinstance(x, list | dict) else json.dumps(x))
    s = " ".join("".join(ch for ch in s if ch.isprintable() or ch.isspace()).split()).replace("`", "'")
    return f"`{s}`" if s else "(empty)"


def benchmark_blocks(bench: dict, heading: str | None = "Benchmark accuracy (lmms-eval)") -> list[Block]:
    """Document blocks of a (rounded) benchmark summary: scores per model, deltas with intervals, changed answers."""
    s, models = bench["settings"], bench["models"]
    names = [m["name"] for m in models]
    limit = f"the first `{s['limit']}` documents of each task" if s.get("limit") else "every document"
    onnx = f", vision tower through onnxruntime (`{s['onnx_dir']}`)" if s.get("onnx_dir") else ""
    cached = ", ".join(f"`{m['name']}`" for m in models if m["cached"]) or "none"
    blocks: list[Block] = [("h2", heading)] if heading else []
    blocks.append(("p", f"Tasks `{', '.join(s['tasks'])}` through lmms-eval `{bench['harness']['version']}` "
                        f"(its prompts, answer parsing and metrics), {limit}, batch 1, greedy unless a task asks "
                        f"to sample, device `{s['device']}`, dtype `{s['dtype']}`{onnx}. Models whose results were "
                        f"reused from an earlier run (same cache key): {cached}."))
    rows = []
    for task in sorted({t for m in models for t in m["scores"]}):
        for metric in sorted({k for m in models for k in m["scores"].get(task, {})}):
            rows.append([f"`{task}`", f"`{metric}`", *[_n(m["scores"].get(task, {}).get(metric)) for m in models],
                         _n(models[0]["samples"].get(task))])
    blocks.append(("table", ["task", "metric", *[f"`{n}`" for n in names], "documents"], rows))
    if bench["deltas"]:
        blocks += [
            ("p", f"Delta is candidate minus reference (`{names[0]}`). The interval (`95%`) is a paired bootstrap "
                  f"over documents (`{s['bootstrap']}` resamples, the same for every model, each scored by the "
                  "task's own aggregation), or, for a metric that cannot be resampled, a normal interval from the "
                  "harness's standard errors."),
            ("table", ["candidate", "task", "metric", "reference", "candidate score", "delta", "interval", "from"],
             [[f"`{d['candidate']}`", f"`{d['task']}`", f"`{d['metric']}`", _n(d["reference_score"]),
               _n(d["candidate_score"]), _n(d["delta"]),
               "n/a" if d["ci_low"] is None else f"[{_n(d['ci_low'])}, {_n(d['ci_high'])}]", f"`{d['ci']}`"]
              for d in bench["deltas"]]),
        ]
    for cand in names[1:]:
        changed = [c for c in bench["changed"] if c["candidate"] == cand]
        if not changed:
            continue
        blocks += [("p", f"`{cand}`: documents whose answer differs from the reference's (score changes first)."),
                   ("table", ["task", "document", "target", "reference answer", "candidate answer", "reference score",
                              "candidate score"],
                    [[f"`{c['task']}`", _n(c["doc_id"]), _text(c["target"]), _text(c["reference_answer"]),
                      _text(c["candidate_answer"]), _n(c["reference_score"]), _n(c["candidate_score"])]
                     for c in changed])]
    return blocks
