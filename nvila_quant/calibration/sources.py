"""Calibration sources -> records (an image or none, plus text).

- ``builtin``: ``data/builtin`` shipped in the package (real photos + captions, text-only lines).
- ``coco``: COCO captions with images through ``datasets`` (needs the Hugging Face hub; offline it fails at once).
- a folder: ``metadata.jsonl`` lines ``{"file_name": ..., "text": ...}`` (+ optional ``text.jsonl``).
- a ``.jsonl`` file: lines ``{"image": path, "text": ...}`` or ``{"text": ...}`` (paths relative to the file).

Every error names the file and line at fault. Images are checked (exist, decodable header) by
:func:`check_images` before any model is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import PIL.Image

from nvila_quant.errors import NVILAError
from nvila_quant.paths import builtin_calib_dir

__all__ = [
    "COCO_DATASET",
    "CalibRecord",
    "CalibrationError",
    "check_images",
    "load_coco",
    "load_records",
    "read_folder",
    "read_jsonl",
]

logger = logging.getLogger(__name__)

COCO_DATASET = ("lmms-lab/COCO-Caption2017", "val")  # (repo id, split): images + five captions each
_CAPTION_FIELDS = ("answer", "captions", "caption", "sentences", "text")
_HINT = "pass --calib builtin, --calib FOLDER (with metadata.jsonl) or --calib FILE.jsonl"


class CalibrationError(NVILAError, ValueError):
    """Calibration data is missing, empty or malformed."""


@dataclass(frozen=True)
class CalibRecord:
    """One calibration item: ``text`` (a caption when ``image`` is set) and an optional image."""

    text: str
    image: Path | PIL.Image.Image | None = None
    origin: str = ""  # "file:line" or "coco:<index>", for messages and the log

    @property
    def kind(self) -> str:
        return "text" if self.image is None else "image"


def _parse_line(path: Path, lineno: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{path}:{lineno} is not valid JSON ({e.msg}); expected an object like "
                               '{"image": "photo.jpg", "text": "a caption"} or {"text": "..."}') from e
    if not isinstance(obj, dict):
        raise CalibrationError(f"{path}:{lineno} must be a JSON object, got {type(obj).__name__}")
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise CalibrationError(f"{path}:{lineno} needs a non-empty string field 'text' (got {text!r})")
    return obj


def _lines(path: Path):
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"cannot read calibration file {path}: {e}") from e
    for lineno, line in enumerate(content.splitlines(), start=1):
        if line.strip():
            yield lineno, line


def read_jsonl(path: str | os.PathLike, image_key: str = "image") -> list[CalibRecord]:
    """Records of a ``.jsonl`` file; image paths are relative to the file's folder."""
    path = Path(path)
    records = []
    for lineno, line in _lines(path):
        obj = _parse_line(path, lineno, line)
        image = obj.get(image_key)
        if image is not None and (not isinstance(image, str) or not image):
            raise CalibrationError(f"{path}:{lineno}: field {image_key!r} must be a path string, got {image!r}")
        records.append(CalibRecord(obj["text"].strip(), None if image is None else path.parent / image,
                                   f"{path}:{lineno}"))
    return records


def read_folder(folder: str | os.PathLike) -> list[CalibRecord]:
    """Records of an image folder: ``metadata.jsonl`` (file_name, text) and optional ``text.jsonl``."""
    folder = Path(folder)
    meta, text = folder / "metadata.jsonl", folder / "text.jsonl"
    if not meta.is_file() and not text.is_file():
        raise CalibrationError(
            f"calibration folder {folder} has neither metadata.jsonl (lines {{\"file_name\": ..., \"text\": ...}}) "
            "nor text.jsonl"
        )
    records = read_jsonl(meta, image_key="file_name") if meta.is_file() else []
    if text.is_file():
        for r in read_jsonl(text):
            if r.image is not None:
                raise CalibrationError(f"{r.origin}: text.jsonl lines are text-only; put images in metadata.jsonl")
            records.append(r)
    return records


def _hub_reachable(timeout: float = 3.0) -> bool:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_coco(n: int, seed: int = 42, dataset: tuple[str, str] = COCO_DATASET) -> list[CalibRecord]:
    """``n`` COCO images with one caption each, streamed through ``datasets`` (shuffled with ``seed``)."""
    offline = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
               if os.environ.get(v, "").lower() in ("1", "true", "yes")]
    if offline:
        raise CalibrationError(f"--calib coco needs the Hugging Face hub but {'/'.join(offline)} is set; {_HINT}")
    if not _hub_reachable():
        raise CalibrationError(f"--calib coco needs the Hugging Face hub, which is not reachable from here; {_HINT}")
    try:
        import datasets

        stream = datasets.load_dataset(dataset[0], split=dataset[1], streaming=True).shuffle(seed=seed, buffer_size=256)
        records = []
        for i, row in enumerate(stream):
            if len(records) >= n:
                break
            caption = next((row[f] for f in _CAPTION_FIELDS if row.get(f)), None)
            caption = caption[0] if isinstance(caption, list | tuple) else caption
            image = row.get("image")
            if isinstance(caption, str) and isinstance(image, PIL.Image.Image):
                records.append(CalibRecord(caption.strip(), image.convert("RGB"), f"coco:{i}"))
    except Exception as e:  # network, auth, schema: all mean "use local data instead"
        raise CalibrationError(f"cannot load COCO captions ({dataset[0]}): {type(e).__name__}: {e}; {_HINT}") from e
    return records


def load_records(source: str | os.PathLike, n_hint: int = 128, seed: int = 42) -> list[CalibRecord]:
    """Records of ``source``: "builtin", "coco", a folder or a ``.jsonl`` file. Raises on an empty set."""
    if str(source) == "builtin":
        records = read_folder(builtin_calib_dir())
    elif str(source) == "coco":
        records = load_coco(n_hint, seed)
    else:
        path = Path(source)
        if path.is_dir():
            records = read_folder(path)
        elif path.is_file() and path.suffix == ".jsonl":
            records = read_jsonl(path)
        elif path.is_file():
            raise CalibrationError(f"calibration file {path} must be a .jsonl file; {_HINT}")
        else:
            raise CalibrationError(f"calibration source {str(source)!r} is not 'builtin', 'coco', a folder "
                                   "or a .jsonl file")
    if not records:
        raise CalibrationError(f"calibration source {str(source)!r} holds no samples; {_HINT}")
    return records


def check_images(records: list[CalibRecord]) -> None:
    """Fail early (before loading any model) on a missing or undecodable image."""
    for r in records:
        if r.image is None or isinstance(r.image, PIL.Image.Image):
            continue
        if not Path(r.image).is_file():
            raise CalibrationError(f"{r.origin}: image file not found: {r.image}")
        try:
            with PIL.Image.open(r.image) as im:
                im.verify()
        except (PIL.UnidentifiedImageError, OSError, ValueError) as e:
            raise CalibrationError(f"{r.origin}: cannot read image {r.image}: {e}") from e
