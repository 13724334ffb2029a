"""Held-out evaluation data: image+caption conversations and text for perplexity.

``builtin`` is ``data/eval`` (shipped in the package) (never used for calibration). A PATH is a folder with
``metadata.jsonl`` (``{"file_name", "text"}`` lines, as ``datasets``' imagefolder) and optionally ``text.jsonl``
(``{"text"}`` lines), or a ``.jsonl`` file mixing ``{"image", "text"}`` and ``{"text"}`` lines.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from nvila_quant.errors import NVILAError
from nvila_quant.paths import builtin_eval_dir

__all__ = ["EvalSample", "EvalSet", "load_eval_set"]


@dataclass(frozen=True)
class EvalSample:
    image: Path
    caption: str


@dataclass
class EvalSet:
    source: str
    conversations: list[EvalSample]
    texts: list[str]


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise NVILAError(f"{path}:{i} is not valid JSON: {e}") from e
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise NVILAError(f"{path}:{i} must be an object with a 'text' string, got {line[:80]!r}")
        rows.append(row)
    return rows


def load_eval_set(spec: str | os.PathLike = "builtin", max_conversations: int | None = None) -> EvalSet:
    """Read an evaluation set; images are checked to exist before any model runs."""
    path = builtin_eval_dir() if str(spec) == "builtin" else Path(spec)
    if not path.exists():
        raise NVILAError(f"evaluation data {path} does not exist (use 'builtin', a folder or a .jsonl file)")
    conversations: list[EvalSample] = []
    texts: list[str] = []
    if path.is_dir():
        meta = path / "metadata.jsonl"
        if not meta.is_file():
            raise NVILAError(f"evaluation folder {path} has no metadata.jsonl (lines of {{'file_name', 'text'}})")
        for row in _read_jsonl(meta):
            if "file_name" not in row:
                raise NVILAError(f"{meta}: every line needs 'file_name', got {row}")
            conversations.append(EvalSample(path / row["file_name"], row["text"]))
        if (path / "text.jsonl").is_file():
            texts = [row["text"] for row in _read_jsonl(path / "text.jsonl")]
    else:
        for row in _read_jsonl(path):
            if row.get("image"):
                image = Path(row["image"])
                conversations.append(EvalSample(image if image.is_absolute() else path.parent / image, row["text"]))
            else:
                texts.append(row["text"])
    missing = [str(s.image) for s in conversations if not s.image.is_file()]
    if missing:
        raise NVILAError(f"evaluation images not found: {', '.join(missing[:3])}")
    if not conversations and not texts:
        raise NVILAError(f"evaluation data {path} is empty")
    if max_conversations is not None:
        conversations = conversations[:max_conversations]
    return EvalSet(str(path), conversations, texts)
