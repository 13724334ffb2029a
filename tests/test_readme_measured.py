"""The README's "Measured here" table is exactly what benchmarks/report.py renders from the committed result files
(benchmarks/results/<benchmark>/*.json), and the comparison catches a hand edit."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("nvq_benchmarks_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_generated_from_results():
    report = _report()
    table = report.render(report.RESULTS)
    diff = report.compare((ROOT / "README.md").read_text(), table)
    assert not diff, "\n".join(diff) + "\nREADME.md differs from the results: run python benchmarks/report.py " \
                                       "--write-readme"


def test_check_detects_a_hand_edit():
    report = _report()
    table = report.render(report.RESULTS)
    readme = report.replace_table((ROOT / "README.md").read_text(), table)
    assert report.compare(readme, table) == []
    lines = table.splitlines()
    rows = lines[len(report.HEADER):]
    if rows:  # change one figure of the first row's result
        what, result, files = rows[0].strip("|").split(" | ")
        digit = re.search(r"\d", result)
        assert digit, rows[0]
        bumped = str((int(digit.group()) + 1) % 10)
        lines[len(report.HEADER)] = f"| {what} | {result[:digit.start()]}{bumped}{result[digit.end():]} | {files} |"
    else:  # no results committed: a hand-written row
        lines.append("| int4 linear on some CPU, 1 token | 9.9x faster than dense bf16 | `results/kernels/` |")
    edited = report.replace_table(readme, "\n".join(lines))
    assert report.compare(edited, table)
    assert report.compare(edited.replace(report.BEGIN, ""), table)  # markers removed: a mismatch too
