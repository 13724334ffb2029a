"""Wall time of the README's commands from a checkout: the whole test suite, the fast suite and the demo.

    python benchmarks/suite.py [--repo DIR] [--skip-full] [--skip-fast] [--skip-demo]

What ``make test``, ``make test-fast`` and ``make demo`` run once the venv exists, each in its own subprocess from
the checkout's root with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 and this interpreter:

- test:      ``python -m pytest -q -ra``
- test-fast: ``python -m pytest -q -ra -m "not slow"``
- demo:      ``nvila-quant demo --workdir <temporary folder> --overwrite`` (the ``nvila-quant`` next to this
  interpreter)

Each command's wall seconds, exit status and, for pytest, the counts of its summary line (passed, failed, skipped,
deselected, ...) are recorded. These are absolute times of one machine: there is no baseline and no ratio.
``--select`` runs pytest on the given paths instead of the whole suite (smoke runs; report.py ignores such runs).
Writes one result file per run, benchmarks/results/suite/<time>-<machine>[-<variant>].json.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, add_results_arg, git_state, table, write_result  # noqa: E402

SUMMARY = re.compile(r"\bin (\d+(?:\.\d+)?)s\b")
COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)\b")


def pytest_summary(output: str) -> dict:
    """Counts and pytest's own seconds from the last summary line ("3 passed, 1 skipped in 4.20s")."""
    for line in reversed(output.strip().splitlines()):
        line = line.strip("= ")
        found = SUMMARY.search(line)
        if found and COUNT.search(line):
            counts: dict[str, int] = {}
            for n, kind in COUNT.findall(line):
                kind = {"error": "errors", "warning": "warnings"}.get(kind, kind)
                counts[kind] = counts.get(kind, 0) + int(n)
            return {"summary": line, "pytest_seconds": float(found.group(1)), **counts}
    return {"summary": None}


def run_command(name: str, argv: list[str], cwd: Path, env: dict[str, str], is_pytest: bool) -> dict:
    print(f"{name}: {' '.join(argv)}", flush=True)
    t = time.perf_counter()
    res = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t
    out = {"name": name, "argv": argv, "seconds": seconds, "minutes": seconds / 60, "rc": res.returncode,
           "ok": res.returncode == 0}
    if is_pytest:
        out.update(pytest_summary(res.stdout))
    if res.returncode:
        out["output_tail"] = (res.stdout + res.stderr)[-4000:]
    print(f"  {seconds:.1f} s, exit status {res.returncode}" + (f": {out['summary']}" if out.get("summary") else ""),
          flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO,
                        help="root of the checkout to time (default: this repository)")
    parser.add_argument("--skip-full", action="store_true", help="do not run the whole suite (make test)")
    parser.add_argument("--skip-fast", action="store_true", help="do not run the fast suite (make test-fast)")
    parser.add_argument("--skip-demo", action="store_true", help="do not run the demo (make demo)")
    parser.add_argument("--select", nargs="+", default=None, metavar="PATH",
                        help="run pytest on these paths (relative to --repo) instead of the whole suite: a smoke run, "
                             "which report.py leaves out")
    parser.add_argument("--variant", default=None,
                        help="a label for this configuration, kept in the result file and its name (default: none)")
    add_results_arg(parser)
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    pytest = [sys.executable, "-m", "pytest", "-q", "-ra", *(args.select or [])]
    commands = []
    if not args.skip_full:
        commands.append(("test", pytest))
    if not args.skip_fast:
        commands.append(("test-fast", [*pytest, "-m", "not slow"]))
    results = []
    with tempfile.TemporaryDirectory(prefix="nvq-suite-demo-") as tmp:
        if not args.skip_demo:
            cli = Path(sys.executable).parent / "nvila-quant"
            commands.append(("demo", [str(cli), "demo", "--workdir", str(Path(tmp) / "demo"), "--overwrite"]))
        for name, cmd in commands:
            results.append(run_command(name, cmd, repo, env, cmd is pytest or name == "test-fast"))
    if not results:
        parser.error("nothing to run: every command was skipped")
    print(table(results, ["name", "minutes", "rc", "passed", "failed", "skipped", "deselected"]))
    payload = {"checkout": {"path": str(repo), **git_state(repo)}, "python": sys.executable, "select": args.select,
               "commands": results, "baseline": None}
    variant = args.variant or ("smoke" if args.select else None)
    path = write_result("suite", payload, variant, "cpu", args.results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
