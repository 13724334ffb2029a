"""Paired bootstrap deltas, standard-error intervals and changed answers (no harness needed)."""

from __future__ import annotations

import numpy as np
import pytest

from nvila_quant.eval.scores import (
    bootstrap_scores,
    changed_examples,
    one_sample_score,
    paired_delta,
    resample_indices,
    stderr_delta,
    takes_items_only,
)


def mean(items):
    return sum(items) / len(items)


def test_paired_bootstrap_of_the_same_resamples():
    idx = resample_indices(20, 500, seed=3)
    assert idx.shape == (500, 20) and np.array_equal(idx, resample_indices(20, 500, seed=3))
    ref = [1.0] * 10 + [0.0] * 10
    same = bootstrap_scores(ref, mean, idx)
    d = paired_delta(0.5, 0.5, same, same)
    assert d["delta"] == 0 and d["ci_low"] == d["ci_high"] == 0  # paired: identical answers, no spread
    better = ref[:10] + [1.0] * 5 + [0.0] * 5  # five more right answers
    d = paired_delta(0.5, 0.75, same, bootstrap_scores(better, mean, idx))
    assert d["delta"] == 0.25 and 0 < d["ci_low"] <= 0.25 <= d["ci_high"] and d["ci"] == "paired bootstrap (500)"


def test_aggregations_and_single_scores():
    def printing(results):
        print("noise")
        return mean([r["ok"] for r in results])

    assert takes_items_only(mean) and takes_items_only(printing)
    assert not takes_items_only(lambda results, args: 0)
    assert one_sample_score({"ok": 1}, printing) == 1.0
    assert one_sample_score(3, lambda items: items[1]) is None  # needs more than one item


def test_stderr_interval():
    d = stderr_delta(0.5, 0.4, 0.03, 0.04)
    assert d["delta"] == pytest.approx(-0.1) and d["ci_high"] - d["ci_low"] == pytest.approx(2 * 1.96 * 0.05)
    assert stderr_delta(0.5, 0.4, None, 0.04)["ci_low"] is None


def test_changed_examples_put_score_changes_first():
    ref = [{"doc_id": i, "target": "A", "answer": a, "scores": {"acc": s}}
           for i, (a, s) in enumerate([("A", 1.0), ("B", 0.0), ("C", 0.0)])]
    cand = [{"doc_id": 0, "target": "A", "answer": "A", "scores": {"acc": 1.0}},
            {"doc_id": 1, "target": "A", "answer": "D", "scores": {"acc": 0.0}},
            {"doc_id": 2, "target": "A", "answer": "A", "scores": {"acc": 1.0}}]
    rows = changed_examples(ref, cand, "acc")
    assert [r["doc_id"] for r in rows] == [2, 1]
    assert rows[0] == {"doc_id": 2, "target": "A", "reference_answer": "C", "candidate_answer": "A",
                       "reference_score": 0.0, "candidate_score": 1.0}
    assert changed_examples(ref, cand, "acc", limit=1) == rows[:1]
