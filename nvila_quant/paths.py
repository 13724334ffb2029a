"""Where the project's shipped data lives (``calib/`` at the repository root)."""

from __future__ import annotations

from pathlib import Path

from nvila_quant.errors import NVILAError

__all__ = ["builtin_calib_dir", "builtin_eval_dir", "repo_root"]


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _data_dir(name: str) -> Path:
    path = repo_root() / "calib" / name
    if not (path / "metadata.jsonl").is_file():
        raise NVILAError(
            f"built-in data folder {path} is missing; install the project from its repository "
            "(pip install -e .) or pass your own data folder"
        )
    return path


def builtin_calib_dir() -> Path:
    """``calib/builtin``: images with captions (+ text.jsonl) used for calibration."""
    return _data_dir("builtin")


def builtin_eval_dir() -> Path:
    """``calib/eval``: held-out images with captions (+ text.jsonl), never used for calibration."""
    return _data_dir("eval")
