"""Where the data shipped inside the package lives (``nvila_quant/data/``: see its DATACARD.md)."""

from __future__ import annotations

from pathlib import Path

from nvila_quant.errors import NVILAError

__all__ = ["DATA_DIR", "builtin_calib_dir", "builtin_eval_dir"]

DATA_DIR = Path(__file__).resolve().parent / "data"


def _data_dir(name: str) -> Path:
    path = DATA_DIR / name
    if not (path / "metadata.jsonl").is_file():
        raise NVILAError(
            f"built-in data folder {path} is missing from this installation of nvila-quant (reinstall it) "
            "or pass your own data folder"
        )
    return path


def builtin_calib_dir() -> Path:
    """``data/builtin``: images with captions (+ text.jsonl) used for calibration."""
    return _data_dir("builtin")


def builtin_eval_dir() -> Path:
    """``data/eval``: held-out images with captions (+ text.jsonl), never used for calibration."""
    return _data_dir("eval")
