"""The benchmark tables: `compare --tasks` adds lmms-eval scores, deltas with intervals and changed answers to
report.md/json/html, every number in the Markdown is in the JSON, and the benchmark models are reused on --overwrite."""

from __future__ import annotations

import json
import re

import pytest
from eval_helpers import needs_lmms_eval, small_tiny, small_tiny_rtn

from nvila_quant.cli import main
from nvila_quant.errors import ConfigError
from nvila_quant.eval import runner as runner_module
from nvila_quant.paths import builtin_eval_dir
from nvila_quant.report.benchmark import benchmark_blocks
from nvila_quant.report.compare import CompareConfig, compare
from nvila_quant.report.document import render_markdown, round_numbers

NUMBER = re.compile(r"(?<![\w.\-])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w.])")


def _numbers(obj, out=None) -> set[float]:
    out = set() if out is None else out
    if isinstance(obj, dict):
        for v in obj.values():
            _numbers(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _numbers(v, out)
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        out.add(float(obj))
    return out


def _md_numbers(text: str) -> list[float]:
    text = re.sub(r"`[^`]*`", "", text)  # names, answers, paths
    text = re.sub(r"\(\w+\.png\)", "", text)
    return [float(x) for line in text.splitlines() if "|---" not in line for x in NUMBER.findall(line)]


def _summary() -> dict:
    model = {"path": "/m", "key": "k", "samples": {"mmmu_val": 30}}
    return round_numbers({
        "harness": {"name": "lmms-eval", "version": "0.7.3"},
        "settings": {"tasks": ["mmmu_val"], "tasks_paths": [], "limit": 30, "device": "cpu", "dtype": "bf16",
                     "onnx_dir": None, "bootstrap": 1000, "seed": 0},
        "models": [{**model, "name": "NVILA-8B", "cached": True, "scores": {"mmmu_val": {"mmmu_acc": 0.4667}},
                    "stderr": {}},
                   {**model, "name": "NVILA-8B-AWQ", "cached": False,
                    "scores": {"mmmu_val": {"mmmu_acc": 0.4333}}, "stderr": {}}],
        "deltas": [{"candidate": "NVILA-8B-AWQ", "task": "mmmu_val", "metric": "mmmu_acc", "reference_score": 0.4667,
                    "candidate_score": 0.4333, "delta": -0.03333333, "ci_low": -0.1, "ci_high": 0.0333,
                    "ci": "paired bootstrap (1000)"}],
        "changed": [{"candidate": "NVILA-8B-AWQ", "task": "mmmu_val", "metric": "mmmu_acc", "doc_id": 7,
                     "target": "B", "reference_answer": "B", "candidate_answer": "C. 12 `apples`\n(guess)",
                     "reference_score": 1.0, "candidate_score": 0.0}],
    })


def test_benchmark_section_renders_every_number_from_the_json():
    summary = _summary()
    md = render_markdown(benchmark_blocks(summary))
    assert "## Benchmark accuracy (lmms-eval)" in md
    assert "| `mmmu_val` | `mmmu_acc` | 0.4667 | 0.4333 | 30 |" in md
    assert "| -0.03333 | [-0.1, 0.0333] | `paired bootstrap (1000)` |" in md
    assert "`C. 12 'apples' (guess)`" in md  # one line, inline code, no backtick inside
    assert "`NVILA-8B`" in md.split("reused")[1].splitlines()[0]  # the cached model is named
    numbers = _numbers(summary)
    assert _md_numbers(md) and all(x in numbers for x in _md_numbers(md))


@needs_lmms_eval
def test_compare_with_tasks_adds_the_benchmark_section(tmp_path_factory, tmp_path, monkeypatch, capsys):
    float_dir, rtn_dir = small_tiny(tmp_path_factory), small_tiny_rtn(tmp_path_factory)
    out = tmp_path / "report"
    evalset = tmp_path / "one.jsonl"  # the rest of the report on one conversation: this test is about the benchmark
    evalset.write_text(json.dumps({"image": str(builtin_eval_dir() / "clock.jpg"), "text": "A clock."}) + "\n")
    cfg = CompareConfig(eval_data=str(evalset), dtype="fp32", device="cpu", speed=False, n_generate=1,
                        max_new_tokens=3, html=True, tasks=["nvq_vqa", "nvq_choice"], tasks_paths=["builtin"], limit=2)
    report = compare(float_dir, [rtn_dir], out, cfg)
    bench = report["benchmark"]
    assert [m["name"] for m in bench["models"]] == ["reference", rtn_dir.name]
    assert {(d["task"], d["metric"]) for d in bench["deltas"]} == {("nvq_vqa", "exact_match"), ("nvq_choice", "acc")}
    for name in ("reference", rtn_dir.name):
        assert (out / "benchmark" / "models" / name / "samples" / "nvq_vqa.jsonl").is_file()
    md = (out / "report.md").read_text()
    assert "## Benchmark accuracy (lmms-eval)" in md and "Benchmark accuracy" in (out / "report.html").read_text()
    saved = json.loads((out / "report.json").read_text())
    assert saved["benchmark"] == bench
    numbers = _numbers(saved)
    assert all(x in numbers for x in _md_numbers(md.split("## Benchmark accuracy")[1]))
    assert not (tmp_path / "report.work").exists()
    # on --overwrite the benchmark models are reused from the report, not evaluated again
    def no_loading(*args, **kwargs):
        raise ConfigError("boom: a benchmark model was loaded")

    monkeypatch.setattr(runner_module, "load_responder", no_loading)
    args = ["compare", "--reference", str(float_dir), "--candidate", str(rtn_dir), "--output", str(out),
            "--eval-data", str(evalset), "--no-speed", "--generations", "1", "--max-new-tokens", "3", "--dtype", "fp32",
            "--device", "cpu", "--tasks", "nvq_vqa,nvq_choice", "--tasks-path", "builtin", "--limit", "2",
            "--overwrite"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"{rtn_dir.name} - reference: nvq_vqa exact_match" in printed
    assert all(m["cached"] for m in json.loads((out / "report.json").read_text())["benchmark"]["models"])


@pytest.mark.parametrize("flag", ["--tasks", "--tasks-path", "--limit"])
def test_compare_help_names_the_benchmark_flags(flag, capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert flag in capsys.readouterr().out
