"""Each checkpoint through lmms-eval in turn, in this process, one model in memory at a time.

A model's results are kept in a folder named by its cache key: the checkpoint's fingerprint (config.json, weight file
sizes and mtimes, the ONNX folder) plus the tasks (names and task-file contents), limit, dtype, device type,
generation settings and harness version. A finished model is never evaluated again while a folder with its key
exists in the work folder (an interrupted run resumes) or in a previous output (``reuse``).

Per model: ``result.json`` (scores, the harness's standard errors, bootstrap resamples), ``samples/<task>.jsonl``
(per document: context, answer, target, metric items and the document's own score) and ``harness.log`` (what the
harness printed).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from nvila_quant.errors import CheckpointError, ConfigError
from nvila_quant.eval.responder import DEFAULT_MAX_NEW_TOKENS, LL_REDUCTIONS, load_responder
from nvila_quant.eval.scores import (
    bootstrap_scores,
    changed_examples,
    one_sample_score,
    paired_delta,
    resample_indices,
    stderr_delta,
    takes_items_only,
)
from nvila_quant.eval.tasks import check_tasks, hub_datasets, is_offline, resolve_tasks_paths, tasks_fingerprint
from nvila_quant.io import atomic_output_dir, read_json, write_json
from nvila_quant.model.config import NVILAConfig

__all__ = ["EvalConfig", "ModelResult", "load_harness", "model_key", "model_names", "run_benchmark"]

logger = logging.getLogger(__name__)

_TASK_MANAGERS: dict[tuple, Any] = {}  # lmms-eval's task index per (task folders, their fingerprint)


@dataclass
class EvalConfig:
    """Settings of a benchmark run.

    Args:
        tasks: lmms-eval task (or group) names; a comma-separated string is split.
        tasks_paths: task folders in lmms-eval's format (its ``--include_path``); ``builtin`` is the package's.
        limit: documents per task (all when None).
        device, dtype: for every model (default: cuda when present; bf16 on CPU, fp16 on CUDA).
        onnx_dir: run the vision tower through onnxruntime from this ``nvila-export onnx`` folder.
        max_new_tokens: answer length where a task sets none.
        ll_reduction: "sum" or "mean" negative log-likelihood for log-likelihood requests.
        bootstrap: resamples for the confidence intervals (0: the harness's standard errors only).
        examples: changed answers listed per candidate and task.
        recompute: ignore cached results.
    """

    tasks: Sequence[str] | str
    tasks_paths: Sequence[str] = field(default_factory=list)
    limit: int | None = None
    device: str | None = None
    dtype: str | None = None
    onnx_dir: str | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    ll_reduction: str = "sum"
    seed: int = 0
    bootstrap: int = 1000
    examples: int = 10
    recompute: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        names = self.tasks.split(",") if isinstance(self.tasks, str) else list(self.tasks)
        self.tasks = [t.strip() for t in names if t.strip()]
        self.tasks_paths = [str(p) for p in self.tasks_paths]
        if not self.tasks:
            raise ConfigError("give at least one task (--tasks mmmu_val,textvqa_val,...)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.bootstrap < 0 or self.examples < 0 or self.max_new_tokens < 1:
            raise ConfigError(f"need bootstrap >= 0, examples >= 0 and max_new_tokens >= 1 (got {self.bootstrap}, "
                              f"{self.examples}, {self.max_new_tokens})")
        if self.ll_reduction not in LL_REDUCTIONS:
            raise ConfigError(f"ll_reduction must be one of {', '.join(LL_REDUCTIONS)}, got {self.ll_reduction!r}")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype is None:
            self.dtype = "fp16" if self.device.startswith("cuda") else "bf16"


@dataclass
class ModelResult:
    """One model's finished evaluation: ``folder`` holds result.json and samples/."""

    name: str
    path: str
    key: str
    folder: Path
    cached: bool
    result: dict

    def samples(self, task: str) -> list[dict]:
        f = self.folder / "samples" / f"{task}.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []


def load_harness() -> Any:
    """The ``lmms_eval`` package, or a ConfigError that says how to install it."""
    try:
        import lmms_eval.evaluator  # noqa: F401
        import lmms_eval.tasks
    except ImportError as e:
        raise ConfigError(f"benchmarks run through lmms-eval, which is not installed ({e}): "
                          "pip install 'nvila-quant[eval]' (see docs/eval.md)") from e
    except RuntimeError as e:  # e.g. a torchvision built for another torch: "operator torchvision::nms does not exist"
        raise ConfigError(f"lmms-eval cannot be imported: {e}. A torchvision built for another torch (PyPI's CUDA "
                          "build next to a CPU torch) breaks it: install the torchvision that matches torch, or "
                          "uninstall torchvision (see docs/eval.md)") from e
    return lmms_eval


def model_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Folder names, made unique with -2, -3, ..."""
    names, seen = [], {}
    for p in paths:
        base = Path(p).name or str(p)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def _harness_version() -> str:
    try:
        return metadata.version("lmms_eval")
    except metadata.PackageNotFoundError:
        return "unknown"


def _files_fingerprint(folder: str | os.PathLike | None) -> str | None:
    if folder is None:
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(folder)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def model_key(path: str | os.PathLike, cfg: EvalConfig, tasks_fp: str) -> str:
    """The cache key of one checkpoint's results under ``cfg``."""
    path = Path(path)
    config = NVILAConfig.from_pretrained(path)
    payload = {
        "weights": config.weights_fingerprint(),
        "config": hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:16],
        "onnx": _files_fingerprint(cfg.onnx_dir),
        "tasks": sorted(cfg.tasks), "task_files": tasks_fp, "limit": cfg.limit, "dtype": cfg.dtype,
        "device": torch.device(cfg.device).type, "max_new_tokens": cfg.max_new_tokens,
        "ll_reduction": cfg.ll_reduction, "seed": cfg.seed, "bootstrap": cfg.bootstrap,
        "harness": _harness_version(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _jsonable(x: Any) -> Any:
    """A JSON-safe copy: images and other objects become ``<TypeName>``."""
    if x is None or isinstance(x, str | bool | int):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return f"<{type(x).__name__}>"


def _leaf_tasks(task_dict: dict) -> dict[str, Any]:
    """{task name: Task} of the harness's (possibly nested, grouped) task dict."""
    out = {}
    for key, value in task_dict.items():
        if isinstance(value, dict):
            out.update(_leaf_tasks(value))
        elif isinstance(value, tuple):
            if value[1] is not None:
                out[str(key)] = value[1]
        elif value is not None:
            out[str(key)] = value
    return out


def _scores(results: dict) -> tuple[dict, dict]:
    """({task: {metric: value}}, {task: {metric: stderr}}) of the harness's numeric results (filter ``none``; other
    filters keep theirs in the metric name)."""
    scores: dict[str, dict] = {}
    stderr: dict[str, dict] = {}
    for task, row in results.items():
        for key, value in row.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else key
            if metric.endswith("_stderr"):
                stderr.setdefault(task, {})[name.replace("_stderr", "", 1)] = float(value)
            elif "_stderr_" not in metric:
                scores.setdefault(task, {})[name] = float(value)
    return scores, stderr


def _answer(sample: dict, task: Any) -> str:
    """What the model answered: the filtered text, or the chosen option (argmin loss) of a multiple-choice task."""
    resps = sample.get("filtered_resps")
    output_type = task.get_config("output_type")
    if output_type == "multiple_choice" and resps:
        losses = [float(r[0]) for r in resps]
        best = int(np.argmin(losses))
        with contextlib.suppress(Exception):
            return str(task.doc_to_choice(sample["doc"])[best])
        return str(best)
    if output_type == "loglikelihood" and resps:
        return f"{float(resps[0][0]):.4g}"
    while isinstance(resps, list | tuple) and resps:
        resps = resps[0]
    return str(resps if resps is not None else "")


def _records(samples: list[dict], task: Any, metrics: list[str], aggregations: dict) -> list[dict]:
    """What samples/<task>.jsonl keeps of each document."""
    rows = []
    for s in samples:
        args = s.get("arguments") or []
        rows.append({
            "doc_id": s["doc_id"], "doc": _jsonable(s.get("doc")), "target": _jsonable(s.get("target")),
            "context": args[0] if args and isinstance(args[0], str) else None, "answer": _answer(s, task),
            "response": _jsonable(s.get("filtered_resps")), "items": {m: _jsonable(s[m]) for m in metrics},
            "scores": {m: one_sample_score(s[m], aggregations[m]) for m in metrics},
        })
    return rows


def _evaluate_model(path: Path, name: str, key: str, cfg: EvalConfig, task_manager: Any, leaf: dict,
                    folder: Path) -> dict:
    """One model through ``simple_evaluate``; writes its folder; returns result.json's content."""
    from lmms_eval.evaluator import simple_evaluate

    from nvila_quant.eval.adapter import NVILAQuant

    responder = load_responder(path, dtype=cfg.dtype, device=cfg.device, onnx_dir=cfg.onnx_dir,
                               max_new_tokens=cfg.max_new_tokens, ll_reduction=cfg.ll_reduction)
    lm = NVILAQuant(responder=responder, name=name, quiet=cfg.quiet)
    with open(folder / "harness.log", "w") as log, contextlib.redirect_stdout(log):
        out = simple_evaluate(model=lm, tasks=list(cfg.tasks), task_manager=task_manager, limit=cfg.limit,
                              log_samples=True, bootstrap_iters=cfg.bootstrap, process_docs_parallel=1,
                              random_seed=cfg.seed, verbosity="ERROR")
    del lm, responder
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    scores, stderr = _scores(out["results"])
    boot: dict[str, dict[str, list[float]]] = {}
    counts = {}
    (folder / "samples").mkdir()
    for task_name, samples in (out.get("samples") or {}).items():
        task = leaf.get(task_name)
        if task is None:
            continue
        aggregations = task.aggregation()
        metrics = [m for m in scores.get(task_name, {}) if m in aggregations and takes_items_only(aggregations[m])
                   and all(m in s for s in samples)]
        rows = sorted({s["doc_id"]: s for s in reversed(samples)}.values(), key=lambda s: s["doc_id"])
        records = _records(rows, task, metrics, aggregations)
        counts[task_name] = len(records)
        with open(folder / "samples" / f"{task_name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        indices = resample_indices(len(rows), cfg.bootstrap, cfg.seed)
        boot[task_name] = {m: bootstrap_scores([s[m] for s in rows], aggregations[m], indices) for m in metrics}
    result = {"name": name, "path": str(path.absolute()), "key": key, "scores": scores, "stderr": stderr,
              "samples": counts, "bootstrap": boot, "harness": {"name": "lmms-eval", "version": _harness_version()},
              "settings": asdict(cfg), "complete": True}
    write_json(folder / "result.json", result)
    return result


def _cached(key: str, work: Path, reuse: Sequence[Path]) -> Path | None:
    """The finished folder of ``key``: in the work folder, or copied there from a previous output."""
    mine = work / "models" / key
    if (mine / "result.json").is_file() and read_json(mine / "result.json").get("complete"):
        return mine
    for root in reuse:
        for f in sorted(Path(root).glob("*/result.json")) if Path(root).is_dir() else []:
            data = read_json(f)
            if data.get("key") == key and data.get("complete"):
                if mine.exists():
                    shutil.rmtree(mine)
                shutil.copytree(f.parent, mine)
                return mine
    return None


def _quiet_harness(verbose: bool) -> None:
    """lmms-eval logs through loguru at DEBUG by default: keep warnings (and info with -v)."""
    from loguru import logger as loguru_logger

    loguru_logger.remove()
    loguru_logger.add(sys.stderr, level="INFO" if verbose else "WARNING")


def run_benchmark(
    checkpoints: Sequence[str | os.PathLike],
    cfg: EvalConfig,
    work_dir: str | os.PathLike,
    reuse: Sequence[str | os.PathLike] = (),
    names: Sequence[str] | None = None,
) -> tuple[dict, list[ModelResult]]:
    """Evaluate each checkpoint (the first is the reference of the deltas); returns the summary (scores per model,
    deltas with confidence intervals, changed answers) and each model's result folder under ``work_dir``."""
    paths = [Path(p) for p in checkpoints]
    for p in paths:
        if not (p / "config.json").is_file():
            raise CheckpointError(f"{p} is not an NVILA checkpoint folder (no config.json)")
    names = list(names) if names is not None else model_names(paths)
    load_harness()
    from lmms_eval.tasks import TaskManager, get_task_dict

    _quiet_harness(logger.isEnabledFor(logging.DEBUG))
    task_paths = resolve_tasks_paths(cfg.tasks_paths)
    tasks_fp = tasks_fingerprint(task_paths)
    index_key = (tuple(str(p) for p in task_paths), tasks_fp)
    if index_key not in _TASK_MANAGERS:  # indexing lmms-eval's ~2000 task files takes seconds: once per process
        _TASK_MANAGERS[index_key] = TaskManager(verbosity="ERROR", include_path=[str(p) for p in task_paths] or None)
    task_manager = _TASK_MANAGERS[index_key]
    check_tasks(task_manager, cfg.tasks)
    hub = hub_datasets(task_manager, cfg.tasks)
    if hub and is_offline():
        listed = ", ".join(f"{t} ({d})" for t, d in sorted(hub.items())[:4]) + (" ..." if len(hub) > 4 else "")
        raise ConfigError(f"tasks read hub data sets that cannot be loaded offline (HF_DATASETS_OFFLINE / "
                          f"HF_HUB_OFFLINE is set): {listed}. Evaluate local task folders instead: --tasks-path DIR "
                          "(lmms-eval's task format; --tasks-path builtin --tasks nvq_mc,nvq_vqa,nvq_choice is the "
                          "built-in set)")
    work = Path(work_dir)
    (work / "models").mkdir(parents=True, exist_ok=True)
    keys = [model_key(p, cfg, tasks_fp) for p in paths]
    done = {k: None if cfg.recompute else _cached(k, work, [Path(r) for r in reuse]) for k in keys}
    leaf: dict[str, Any] = {}
    if any(v is None for v in done.values()):
        try:
            leaf = _leaf_tasks(get_task_dict(list(cfg.tasks), task_manager))
        except Exception as e:  # the data sets: an unreachable hub, a missing local file
            hint = (" (hub data sets: " + ", ".join(sorted(set(hub.values()))) + "); offline, evaluate local task "
                    "folders with --tasks-path DIR") if hub else ""
            raise ConfigError(f"lmms-eval could not load the data of tasks {', '.join(cfg.tasks)}: "
                              f"{type(e).__name__}: {e}{hint}") from e

    models: list[ModelResult] = []
    for name, path, key in tqdm(list(zip(names, paths, keys, strict=True)), desc="models", disable=cfg.quiet):
        folder = done[key]
        cached = folder is not None
        if folder is None:
            with atomic_output_dir(work / "models" / key, overwrite=True) as tmp:
                _evaluate_model(path, name, key, cfg, task_manager, leaf, tmp)
            folder = work / "models" / key
        result = read_json(folder / "result.json")
        logger.info("%s: %s%s", name, json.dumps(result["scores"]), " (cached)" if cached else "")
        models.append(ModelResult(name, str(path.absolute()), key, folder, cached, result))
    return summarize(models, cfg), models


def summarize(models: Sequence[ModelResult], cfg: EvalConfig) -> dict:
    """Scores per model, each candidate's deltas to the first model (the reference) with confidence intervals, and
    the documents whose answers changed."""
    summary: dict[str, Any] = {
        "harness": {"name": "lmms-eval", "version": models[0].result["harness"]["version"] if models else None},
        "settings": {"tasks": list(cfg.tasks), "tasks_paths": list(cfg.tasks_paths), "limit": cfg.limit,
                     "device": cfg.device, "dtype": cfg.dtype, "onnx_dir": cfg.onnx_dir,
                     "max_new_tokens": cfg.max_new_tokens, "ll_reduction": cfg.ll_reduction, "seed": cfg.seed,
                     "bootstrap": cfg.bootstrap},
        "models": [{"name": m.name, "path": m.path, "key": m.key, "cached": m.cached,
                    "scores": m.result["scores"], "stderr": m.result["stderr"], "samples": m.result["samples"]}
                   for m in models],
        "deltas": [], "changed": [],
    }
    if len(models) < 2:
        return summary
    ref = models[0]
    for cand in models[1:]:
        for task, metrics in ref.result["scores"].items():
            for metric, ref_value in metrics.items():
                cand_value = cand.result["scores"].get(task, {}).get(metric)
                if cand_value is None:
                    continue
                rb = ref.result["bootstrap"].get(task, {}).get(metric)
                cb = cand.result["bootstrap"].get(task, {}).get(metric)
                if rb and cb and len(rb) == len(cb):
                    d = paired_delta(ref_value, cand_value, rb, cb)
                else:
                    d = stderr_delta(ref_value, cand_value, ref.result["stderr"].get(task, {}).get(metric),
                                     cand.result["stderr"].get(task, {}).get(metric))
                summary["deltas"].append({"candidate": cand.name, "task": task, "metric": metric,
                                          "reference_score": ref_value, "candidate_score": cand_value, **d})
        for task in ref.result["samples"]:
            metric = next(iter(ref.result["bootstrap"].get(task, {})), "")
            for row in changed_examples(ref.samples(task), cand.samples(task), metric, cfg.examples):
                summary["changed"].append({"candidate": cand.name, "task": task, "metric": metric, **row})
    return summary
