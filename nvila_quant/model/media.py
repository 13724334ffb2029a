"""Media: image/video wrappers, loading, and NVILA's tilings (dynamic S2 and InternVL-style dynamic).

Tiling follows VILA's ``mm_utils`` exactly (grid choice, tie rule, row-major crops, PIL bicubic).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image

from nvila_quant.errors import MediaError

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "Image",
    "Video",
    "dynamic_preprocess",
    "dynamic_s2_preprocess",
    "find_closest_aspect_ratio",
    "load_image",
    "load_video_frames",
    "target_ratios",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpeg", ".mpg"}


@dataclass
class Image:
    """An image given by path (``llava.media.Image``)."""

    path: str | os.PathLike


@dataclass
class Video:
    """A video: a file, a folder of frames, or a list of frames (PIL images or HxWx3 uint8 arrays)."""

    path: str | os.PathLike | None = None
    frames: Sequence[PIL.Image.Image | np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.path is None) == (self.frames is None):
            raise MediaError("Video needs exactly one of path= or frames=")


def load_image(image: PIL.Image.Image | Image | str | os.PathLike) -> PIL.Image.Image:
    """Open an image (path, ``Image`` or PIL) as RGB, with errors that name the file."""
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    path = Path(image.path if isinstance(image, Image) else image)
    if not path.is_file():
        raise MediaError(f"image file not found: {path}")
    try:
        with PIL.Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (PIL.UnidentifiedImageError, OSError, ValueError) as e:
        raise MediaError(f"cannot read image {path}: {e}") from e


# ---------------------------------------------------------------------------- tiling
def target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """Candidate grids (cols, rows) with min_num <= cols*rows <= max_num, sorted by area (VILA order)."""
    ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(ratios, key=lambda r: r[0] * r[1])


def find_closest_aspect_ratio(
    aspect_ratio: float, ratios: list[tuple[int, int]], width: int, height: int, image_size: int
) -> tuple[int, int]:
    """The grid whose cols/rows is closest to ``aspect_ratio``; ties go to the later (larger) grid
    when the image area exceeds half the grid's pixel area."""
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for ratio in ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    return best


def _crop_grid(image: PIL.Image.Image, cols: int, rows: int, image_size: int) -> list[PIL.Image.Image]:
    resized = image.resize((image_size * cols, image_size * rows), PIL.Image.BICUBIC)
    return [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]


def dynamic_s2_preprocess(
    image: PIL.Image.Image, s2_scales: list[int], max_num: int = 12, image_size: int = 448
) -> tuple[list[PIL.Image.Image], tuple[int, int]]:
    """NVILA's dynamic-S2 tiles: square grids for all but the last scale, then an aspect-ratio grid.

    Returns (tiles, (rows, cols) of the last scale). 1024x1024 -> 1 + 4 + 9 tiles, (3, 3).
    """
    width, height = image.size
    min_num = (s2_scales[-1] // s2_scales[0]) ** 2
    if max_num < min_num:
        raise MediaError(f"max_tiles={max_num} is below the {min_num} tiles the largest S2 scale needs")
    tiles: list[PIL.Image.Image] = []
    for scale in s2_scales[:-1]:
        n = scale // s2_scales[0]
        tiles += _crop_grid(image, n, n, image_size)
    cols, rows = find_closest_aspect_ratio(width / height, target_ratios(min_num, max_num), width, height, image_size)
    tiles += _crop_grid(image, cols, rows, image_size)
    return tiles, (rows, cols)


def dynamic_preprocess(
    image: PIL.Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True
) -> list[PIL.Image.Image]:
    """NVILA-Lite's (InternVL) tiling: an aspect-ratio grid plus a whole-image thumbnail when > 1 tile."""
    width, height = image.size
    cols, rows = find_closest_aspect_ratio(width / height, target_ratios(min_num, max_num), width, height, image_size)
    tiles = _crop_grid(image, cols, rows, image_size)
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), PIL.Image.BICUBIC))
    return tiles


# ---------------------------------------------------------------------------- video
def _uniform_indices(n_total: int, n_frames: int) -> list[int]:
    return np.round(np.linspace(0, n_total - 1, n_frames)).astype(int).tolist()


def _frame_to_pil(frame: PIL.Image.Image | np.ndarray, where: str) -> PIL.Image.Image:
    if isinstance(frame, PIL.Image.Image):
        return frame.convert("RGB")
    arr = np.asarray(frame)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise MediaError(f"{where}: video frames must be HxWx3 arrays or PIL images, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(arr[..., :3])


def load_video_frames(video: Video, num_frames: int, fps: float = 0.0) -> list[PIL.Image.Image]:
    """Sample ``num_frames`` frames uniformly (or, with ``fps`` > 0, at that rate capped to ``num_frames``)."""
    if video.frames is not None:
        frames = list(video.frames)
        if not frames:
            raise MediaError("Video(frames=[]) has no frames")
        idx = _uniform_indices(len(frames), min(num_frames, len(frames)))
        return [_frame_to_pil(frames[i], f"frame {i}") for i in idx]
    path = Path(video.path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise MediaError(f"video folder {path} holds no image frames")
        return [load_image(files[i]) for i in _uniform_indices(len(files), min(num_frames, len(files)))]
    if not path.is_file():
        raise MediaError(f"video file not found: {path}")
    return _decode_video(path, num_frames, fps)


def _decode_video(path: Path, num_frames: int, fps: float) -> list[PIL.Image.Image]:
    import av  # PyAV: a real demuxer/decoder (ffmpeg), imported lazily

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path} has no video stream")
            stream = container.streams.video[0]
            # count frames from packets: stream.frames is absent or wrong for many containers
            n_total = sum(1 for p in container.demux(stream) if p.size > 0)
        if n_total == 0:
            raise MediaError(f"video {path} has no frames")
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            n = min(num_frames, n_total)
            if fps > 0 and stream.average_rate:
                duration = n_total / float(stream.average_rate)
                n = max(1, min(n, int(duration * fps)))
            wanted = _uniform_indices(n_total, n)
            keep = set(wanted)
            frames: dict[int, PIL.Image.Image] = {}
            for i, frame in enumerate(container.decode(stream)):
                if i in keep:
                    frames[i] = frame.to_image().convert("RGB")
                if i >= wanted[-1]:
                    break
    except (av.error.FFmpegError, OSError) as e:  # type: ignore[attr-defined]
        raise MediaError(f"cannot read video {path}: {e}") from e
    missing = [i for i in wanted if i not in frames]
    if missing:
        logger.warning("video %s: %d of %d sampled frames could not be decoded", path, len(missing), len(wanted))
    out = [frames[i] for i in wanted if i in frames]
    if not out:
        raise MediaError(f"no frame of video {path} could be decoded")
    return out
