"""Benchmark tasks: local task folders, their fingerprint, and the check that fails fast on hub data sets offline.

Tasks are lmms-eval's own (names such as ``mmmu_val``, ``textvqa_val``) or come from task folders in lmms-eval's
format (``--tasks-path``, lmms-eval's ``--include_path``). ``builtin`` is the folder shipped in the package,
``nvila_quant/data/eval_tasks``: three small tasks on the held-out images of ``data/eval`` (``nvq_mc``: multiple
choice in MMMU's format; ``nvq_vqa``: open answers in TextVQA's format; ``nvq_choice``: multiple choice scored by
log-likelihood), for offline smoke runs and the tests.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from nvila_quant.errors import ConfigError
from nvila_quant.paths import DATA_DIR

__all__ = [
    "BUILTIN",
    "BUILTIN_TASKS",
    "builtin_tasks_dir",
    "check_tasks",
    "hub_datasets",
    "is_offline",
    "resolve_tasks_paths",
    "tasks_fingerprint",
]

BUILTIN = "builtin"
BUILTIN_TASKS = ("nvq_mc", "nvq_vqa", "nvq_choice")
# `datasets` builders that read local files (lmms-eval resolves their data_files against the task folder)
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "pandas", "arrow", "imagefolder", "videofolder", "audiofolder"}
_TEXT_SUFFIXES = {".yaml", ".yml", ".py", ".json", ".jsonl", ".txt", ".md"}


def builtin_tasks_dir() -> Path:
    """``data/eval_tasks``: the built-in local tasks (lmms-eval's task format)."""
    path = DATA_DIR / "eval_tasks"
    if not (path / "utils.py").is_file():
        raise ConfigError(f"the built-in task folder {path} is missing from this installation (reinstall nvila-quant)")
    return path


def resolve_tasks_paths(specs: Sequence[str | os.PathLike]) -> list[Path]:
    """Task folders from ``--tasks-path`` values: ``builtin`` or a folder of lmms-eval task files."""
    paths = []
    for spec in specs:
        path = builtin_tasks_dir() if str(spec) == BUILTIN else Path(spec).absolute()
        if not path.is_dir():
            raise ConfigError(f"--tasks-path {spec} is not a folder (give a folder of lmms-eval task .yaml files, "
                              "or 'builtin')")
        paths.append(path)
    return paths


def tasks_fingerprint(paths: Sequence[Path]) -> str:
    """A hash of the task folders' definitions: the content of their text files (yaml, py, jsonl, ...), the size of
    the others. Part of each model's cache key, so an edited task is evaluated again."""
    h = hashlib.sha256()
    for root in paths:
        for f in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes() if f.suffix in _TEXT_SUFFIXES else str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


def is_offline() -> bool:
    """Whether the environment forbids the hub (``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def check_tasks(task_manager: Any, names: Sequence[str]) -> None:
    """Refuse task names lmms-eval does not know (with the closest known names), before any model is loaded."""
    known = task_manager.task_index
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown task {name!r}{hint} (lmms-eval's task names, or a task of a --tasks-path "
                              "folder)")


def _leaf_configs(task_manager: Any, name: str, depth: int = 0) -> Iterator[tuple[str, dict]]:
    """(task name, its yaml config without functions) of every task a task, group or tag name stands for."""
    from lmms_eval.utils import load_yaml_config

    entry = task_manager.task_index.get(name)
    if entry is None or depth > 8:
        return
    yaml_path = entry.get("yaml_path")
    if entry["type"] == "tag":
        for sub in entry.get("task", []):
            yield from _leaf_configs(task_manager, sub, depth + 1)
        return
    if not isinstance(yaml_path, str) or not yaml_path:
        return
    config = load_yaml_config(yaml_path, mode="simple")
    if entry["type"] in ("task", "python_task"):
        yield name, config
        return
    for sub in config.get("task", []):  # a group: names, or inline task configs
        if isinstance(sub, str):
            yield from _leaf_configs(task_manager, sub, depth + 1)
        elif isinstance(sub, dict) and isinstance(sub.get("task"), str):
            yield sub["task"], sub


def hub_datasets(task_manager: Any, names: Sequence[str]) -> dict[str, str]:
    """{task: hub data set} for the tasks ``names`` stand for whose data would come from a data-set hub."""
    out = {}
    for name in names:
        for task, config in _leaf_configs(task_manager, name):
            path = config.get("dataset_path")
            kwargs = config.get("dataset_kwargs") or {}
            if not isinstance(path, str) or path in _LOCAL_BUILDERS or kwargs.get("load_from_disk"):
                continue
            if not Path(path).expanduser().exists():
                out[task] = path
    return out
