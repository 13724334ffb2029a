"""Benchmark scores from the harness's per-sample output: paired bootstrap deltas and the answers that changed.

Every model's per-sample metric items are aggregated with the task's own aggregation function (lmms-eval's) on the
same ``iters`` resamples of the documents (drawn from the document count and a seed alone), so a candidate's delta
to the reference is a *paired* bootstrap: ``delta_b = agg(cand[idx_b]) - agg(ref[idx_b])``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["bootstrap_scores", "changed_examples", "one_sample_score", "paired_delta", "resample_indices",
           "stderr_delta", "takes_items_only"]


def resample_indices(n: int, iters: int, seed: int = 0) -> np.ndarray:
    """(iters, n) document indices drawn with replacement; the same for every model given n, iters and seed."""
    return np.random.default_rng(seed).integers(0, n, size=(iters, n)) if n and iters else np.zeros((0, n), int)


def takes_items_only(aggregate: Callable) -> bool:
    """Whether an aggregation function takes just the list of items (some also want the harness's CLI args)."""
    try:
        params = [p for p in inspect.signature(aggregate).parameters.values()
                  if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(params) == 1


def _quiet(aggregate: Callable, items: list) -> float:
    with contextlib.redirect_stdout(io.StringIO()):  # some aggregations print (MMMU's does)
        return float(aggregate(items))


def bootstrap_scores(items: Sequence[Any], aggregate: Callable, indices: np.ndarray) -> list[float]:
    """``aggregate`` over each resample (row of ``indices``) of ``items``."""
    return [_quiet(aggregate, [items[i] for i in row]) for row in indices]


def one_sample_score(item: Any, aggregate: Callable) -> float | None:
    """A single document's score: its item aggregated alone (1/0 for an accuracy)."""
    try:
        value = _quiet(aggregate, [item])
    except Exception:  # an aggregation that needs more than one item
        return None
    return value if math.isfinite(value) else None


def paired_delta(reference: float, candidate: float, ref_boot: Sequence[float], cand_boot: Sequence[float],
                 level: float = 0.95) -> dict:
    """``candidate - reference`` and its percentile confidence interval from paired bootstrap resamples."""
    diffs = np.asarray(cand_boot, dtype=float) - np.asarray(ref_boot, dtype=float)
    tail = (1 - level) / 2 * 100
    low, high = (float(np.percentile(diffs, tail)), float(np.percentile(diffs, 100 - tail))) if diffs.size else (
        None, None)
    return {"delta": candidate - reference, "ci_low": low, "ci_high": high, "ci": f"paired bootstrap ({diffs.size})"}


def stderr_delta(reference: float, candidate: float, ref_se: float | None, cand_se: float | None,
                 level: float = 0.95) -> dict:
    """``candidate - reference`` with a normal interval from the harness's standard errors (treated as independent;
    used where no bootstrap is possible)."""
    if ref_se is None or cand_se is None:
        return {"delta": candidate - reference, "ci_low": None, "ci_high": None, "ci": "none"}
    z = {0.9: 1.645, 0.95: 1.96, 0.99: 2.576}.get(level, 1.96)
    half = z * math.sqrt(ref_se**2 + cand_se**2)
    d = candidate - reference
    return {"delta": d, "ci_low": d - half, "ci_high": d + half, "ci": "harness stderr"}


def changed_examples(reference: Sequence[dict], candidate: Sequence[dict], metric: str, limit: int = 10) -> list[dict]:
    """Documents whose answer differs between two models (by doc_id), those whose score changed first."""
    cand = {s["doc_id"]: s for s in candidate}
    rows = []
    for r in reference:
        c = cand.get(r["doc_id"])
        if c is None or c["answer"] == r["answer"]:
            continue
        rs, cs = r["scores"].get(metric), c["scores"].get(metric)
        rows.append({"doc_id": r["doc_id"], "target": r["target"], "reference_answer": r["answer"],
                     "candidate_answer": c["answer"], "reference_score": rs, "candidate_score": cs})
    rows.sort(key=lambda x: x["reference_score"] == x["candidate_score"])  # score changes first, stable otherwise
    return rows[:limit]
