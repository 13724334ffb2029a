"""Processor of the flat "-hf" NVILA / NVILA-Lite checkpoints (remote code: loaded with ``trust_remote_code=True``).

``NVILAProcessor(text=..., images=..., videos=..., return_tensors=...)`` returns the keys SGLang's NVILA processor
reads (``process_mm_data`` / ``collect_mm_items_from_processor_output`` in sglang's ``base_processor.py``):

- ``input_ids`` / ``attention_mask``: every ``<image>`` / ``<vila/video>`` placeholder replaced by the media token
  once per LLM embedding the model puts there, each block followed by the media encoder's end tokens ("\\n"), so the
  sequence is the one NVILA's runtime builds (its encoders append the embedding of "\\n" after every image, tile or
  video frame);
- ``pixel_values``: the image tiles (num_tiles, 3, S, S), in the order the vision tower takes them;
- ``pixel_values_videos``: the frames of every video (total frames, 3, S, S);
- ``block_sizes``: dynamic S2 only, the last scale's (rows, cols) of every S2-tiled image (None for an image encoded
  as one tile); absent when no image was S2-tiled.

Media layout, per prompt (VILA's ``prepare_media``), with side = S / patch_size (32), k = the projector's downsample
(2 on NVILA, 3 on NVILA-Lite) and T = ceil(side / k)^2 tokens per tile (256, 121):

- one image, "dynamic_s2": the tiles of every S2 scale; one block of rows * cols * T tokens (merged at the largest
  scale), then "\\n";
- one image, "dynamic": an aspect-ratio grid plus a thumbnail; the placeholder becomes one ``<image>\\n`` per tile
  (in the text), each expanded to T tokens + "\\n";
- several images (or another aspect mode): each image one tile, T tokens + "\\n";
- a video: its frames (sampled uniformly), each one tile, T tokens + "\\n" per frame.

There is deliberately no ``_get_num_multimodal_tokens``: SGLang's retokenization shortcut built on it would drop the
"\\n" tokens; without it SGLang keeps these ``input_ids``. Self-contained: transformers, torch, numpy and PIL only.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
import transformers
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

__all__ = ["NVILAProcessor", "dynamic_preprocess", "dynamic_s2_preprocess", "find_closest_aspect_ratio"]

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_VIDEO_TOKEN = "<vila/video>"
_BASIC_ENCODERS = ("BasicImageEncoder", "BasicVideoEncoder")


# ---------------------------------------------------------------------------- tiling
# Copied from nvila_quant.model.media (VILA's mm_utils): grid choice, tie rule, row-major crops, PIL bicubic.
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


def crop_grid(image: PIL.Image.Image, cols: int, rows: int, image_size: int) -> list[PIL.Image.Image]:
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
        raise ValueError(f"max_tiles={max_num} is below the {min_num} tiles the largest S2 scale needs")
    tiles: list[PIL.Image.Image] = []
    for scale in s2_scales[:-1]:
        n = scale // s2_scales[0]
        tiles += crop_grid(image, n, n, image_size)
    cols, rows = find_closest_aspect_ratio(width / height, target_ratios(min_num, max_num), width, height, image_size)
    tiles += crop_grid(image, cols, rows, image_size)
    return tiles, (rows, cols)


def dynamic_preprocess(
    image: PIL.Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True
) -> list[PIL.Image.Image]:
    """NVILA-Lite's (InternVL) tiling: an aspect-ratio grid plus a whole-image thumbnail when > 1 tile."""
    width, height = image.size
    cols, rows = find_closest_aspect_ratio(width / height, target_ratios(min_num, max_num), width, height, image_size)
    tiles = crop_grid(image, cols, rows, image_size)
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), PIL.Image.BICUBIC))
    return tiles


# ---------------------------------------------------------------------------- inputs
def to_pil(item: Any, where: str) -> PIL.Image.Image:
    """An RGB PIL image from a PIL image, an HxWxC array or a CxHxW / HxWxC tensor (uint8, or floats in [0, 1])."""
    if isinstance(item, PIL.Image.Image):
        return item.convert("RGB")
    arr = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # CxHxW -> HxWxC
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"{where}: expected an HxWx3 image or a PIL image, got an array of shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(arr[..., :3])


def flat_images(images: Any) -> list[PIL.Image.Image]:
    """None, one image or (nested) lists of images -> a flat list of RGB PIL images."""
    if images is None:
        return []
    if isinstance(images, list | tuple):
        return [image for item in images for image in flat_images(item)]
    if isinstance(images, np.ndarray | torch.Tensor) and images.ndim == 4:  # a batch of images
        return [to_pil(image, "images") for image in images]
    return [to_pil(images, "images")]


def video_list(videos: Any) -> list[list[Any]]:
    """None, one video or a list of videos (each a list of frames or an (F, H, W, C) array) -> list of frame lists."""
    if videos is None:
        return []
    if isinstance(videos, np.ndarray | torch.Tensor):
        return [list(videos)] if videos.ndim == 4 else [list(v) for v in videos]
    videos = list(videos)
    if videos and not isinstance(videos[0], list | tuple | np.ndarray | torch.Tensor):
        return [videos]  # one video given as a list of PIL frames
    if videos and isinstance(videos[0], np.ndarray | torch.Tensor) and videos[0].ndim == 3:
        return [videos]  # one video given as a list of HxWxC frames
    return [list(v) for v in videos]


def downsample_factor(projector_type: str) -> int:
    """k of the projector's k x k token downsample (1 when it keeps every token), as the runtime reads it."""
    if projector_type == "mlp_downsample_3x3_fix":
        return 3
    return 2 if projector_type.startswith("mlp_downsample") else 1


def uniform_indices(n_total: int, n_frames: int) -> list[int]:
    return np.round(np.linspace(0, n_total - 1, n_frames)).astype(int).tolist()


def tile_size(size: Any) -> int:
    """The square tile side of an image processor's ``size`` (a dict or transformers' SizeDict)."""
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    height = get("height") or get("shortest_edge")
    width = get("width") or height
    if height is None or height != width:
        raise ValueError(f"NVILA tiles are square; the image processor's size is {size}")
    return int(height)


# ---------------------------------------------------------------------------- processor
class NVILAProcessor(ProcessorMixin):
    """SigLIP image processor + Qwen2 tokenizer with NVILA's media layout (see the module docstring).

    Args:
        image_processor: SigLIP image processor (its size is forced to ``image_size``).
        tokenizer: Qwen2 tokenizer holding ``<image>`` and ``<vila/video>`` (as ``image_token`` / ``video_token``).
        image_aspect_ratio: "dynamic_s2" (NVILA), "dynamic" (NVILA-Lite); anything else: one tile per image.
        s2_scales / s2_resize_output_to_scale_idx / min_tiles / max_tiles: the tiling, as in config.json.
        image_size / patch_size: vision tile side (default: the image processor's size) and patch size.
        mm_projector_type: fixes the projector's downsample (2x2 or 3x3; 1 otherwise).
        num_video_frames: frames sampled from a video unless the call passes ``num_frames``.
        image_encoder / video_encoder: VILA encoder specs; Basic encoders only (start / end tokens honoured).
    """

    attributes = ["image_processor", "tokenizer"]  # transformers 4.x; 5.x reads the __init__ signature
    if int(transformers.__version__.split(".")[0]) < 5:
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        image_aspect_ratio: str = "dynamic_s2",
        s2_scales: Sequence[int] | str | None = None,
        s2_resize_output_to_scale_idx: int = -1,
        min_tiles: int = 1,
        max_tiles: int = 12,
        image_size: int | None = None,
        patch_size: int = 14,
        mm_projector_type: str = "mlp_downsample_2x2_fix",
        num_video_frames: int = 8,
        image_encoder: dict | None = None,
        video_encoder: dict | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(s2_scales, str):
            s2_scales = [int(s) for s in s2_scales.split(",") if s.strip()]
        self.image_aspect_ratio = image_aspect_ratio
        self.s2_scales = [int(s) for s in (s2_scales or (448, 896, 1344))]
        self.s2_resize_output_to_scale_idx = int(s2_resize_output_to_scale_idx)
        self.min_tiles, self.max_tiles = int(min_tiles), int(max_tiles)
        self.image_size = None if image_size is None else int(image_size)
        self.patch_size = int(patch_size)
        self.mm_projector_type = mm_projector_type
        self.num_video_frames = int(num_video_frames)
        self.image_encoder = dict(image_encoder or {"_target_": "llava.model.encoders.BasicImageEncoder"})
        self.video_encoder = dict(video_encoder or {"_target_": "llava.model.encoders.BasicVideoEncoder"})
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_token = getattr(tokenizer, "image_token", None) or DEFAULT_IMAGE_TOKEN
        self.video_token = getattr(tokenizer, "video_token", None) or DEFAULT_VIDEO_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "pixel_values_videos", "block_sizes"]

    # ------------------------------------------------------------------ geometry
    @property
    def tile_size(self) -> int:
        return self.image_size if self.image_size is not None else tile_size(self.image_processor.size)

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens of one tile: ceil(side / k)^2 (256 on NVILA, 121 on NVILA-Lite)."""
        side = self.tile_size // self.patch_size
        return math.ceil(side / downsample_factor(self.mm_projector_type)) ** 2

    def s2_tokens(self, block_size: tuple[int, int]) -> int:
        """LLM tokens of one S2-tiled image: its merged map, at the scale the others are resized to, in tiles."""
        per_side = math.isqrt(self.tokens_per_tile)
        idx = self.s2_resize_output_to_scale_idx % len(self.s2_scales)
        if idx == len(self.s2_scales) - 1:
            rows, cols = block_size
        else:
            rows = cols = self.s2_scales[idx] // self.s2_scales[0]
        return rows * cols * per_side * per_side

    def encoder_token_ids(self, spec: dict, kind: str) -> tuple[list[int], list[int]]:
        """(start ids, end ids) a Basic media encoder puts around every block (end: "\\n" by default)."""
        spec = dict(spec)
        name = str(spec.pop("_target_", "")).rsplit(".", 1)[-1]
        if name not in _BASIC_ENCODERS:
            raise ValueError(
                f"{kind} encoder {name!r} is not supported: the -hf model feeds each {kind} block as is "
                f"(supported: {', '.join(_BASIC_ENCODERS)})"
            )

        def ids(tokens: str | None) -> list[int]:
            return [] if tokens is None else list(self.tokenizer(tokens, add_special_tokens=False)["input_ids"])

        return ids(spec.get("start_tokens")), ids(spec.get("end_tokens", "\n"))

    def pixels(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        """PIL images -> (N, 3, S, S) float pixels (the image processor at the tile size)."""
        size = {"height": self.tile_size, "width": self.tile_size}
        return self.image_processor(images, size=size, return_tensors="pt")["pixel_values"]

    # ------------------------------------------------------------------ call
    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        videos: Any = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Expand the media placeholders of ``text`` and preprocess ``images`` / ``videos`` (see module docstring).

        Keyword arguments read: ``padding``, ``add_special_tokens``, ``do_sample_frames`` / ``num_frames`` (also
        inside ``videos_kwargs``) and ``device`` (where the pixel tensors go); others are accepted and ignored.
        """
        if text is None:
            raise ValueError("NVILAProcessor needs text holding one placeholder per image / video")
        texts = [text] if isinstance(text, str) else list(text)
        image_list, videos_frames = flat_images(images), video_list(videos)
        videos_kwargs = dict(kwargs.get("videos_kwargs") or {})
        do_sample = kwargs.get("do_sample_frames", videos_kwargs.get("do_sample_frames", True))
        num_frames = kwargs.get("num_frames", videos_kwargs.get("num_frames")) or self.num_video_frames
        add_special_tokens = kwargs.get("add_special_tokens", True)
        for name, tid, token, given in (("image", self.image_token_id, self.image_token, image_list),
                                        ("video", self.video_token_id, self.video_token, videos_frames)):
            if given and (not isinstance(tid, int) or tid == self.tokenizer.unk_token_id):
                raise ValueError(f"the tokenizer has no {name} token {token!r}; NVILA's -hf tokenizer adds it")

        image_queue, video_queue = deque(image_list), deque(videos_frames)
        tiles: list[PIL.Image.Image] = []
        frames: list[PIL.Image.Image] = []
        block_sizes: list[tuple[int, int] | None] = []
        all_ids: list[list[int]] = []
        for i, sample in enumerate(texts):
            n_images, n_videos = sample.count(self.image_token), sample.count(self.video_token)
            if n_images > len(image_queue) or n_videos > len(video_queue):
                raise ValueError(
                    f"text {i} has {n_images} {self.image_token} and {n_videos} {self.video_token} placeholder(s) "
                    f"but only {len(image_queue)} image(s) and {len(video_queue)} video(s) are left"
                )
            sample_images = [image_queue.popleft() for _ in range(n_images)]
            image_blocks: list[int] = []
            if n_images == 1 and self.image_aspect_ratio == "dynamic":
                image_tiles = dynamic_preprocess(sample_images[0], self.min_tiles, self.max_tiles, self.tile_size)
                sample = sample.replace(self.image_token, f"{self.image_token}\n" * len(image_tiles))
                tiles += image_tiles
                image_blocks = [self.tokens_per_tile] * len(image_tiles)
            elif n_images == 1 and self.image_aspect_ratio == "dynamic_s2":
                image_tiles, block_size = dynamic_s2_preprocess(
                    sample_images[0], self.s2_scales, self.max_tiles, self.tile_size
                )
                tiles += image_tiles
                image_blocks = [self.s2_tokens(block_size)]
                block_sizes.append(block_size)
            else:
                tiles += sample_images
                image_blocks = [self.tokens_per_tile] * n_images
                block_sizes += [None] * n_images
            video_blocks = []
            for k in range(n_videos):
                video = video_queue.popleft()
                if not video:
                    raise ValueError(f"text {i}: video {k} has no frames")
                keep = uniform_indices(len(video), min(num_frames, len(video))) if do_sample else range(len(video))
                frames += [to_pil(video[j], f"video {k} frame {j}") for j in keep]
                video_blocks.append(len(keep))
            all_ids.append(self.expand(sample, image_blocks, video_blocks, add_special_tokens, bool(n_videos)))
        if image_queue or video_queue:
            raise ValueError(
                f"{len(image_queue)} image(s) and {len(video_queue)} video(s) have no placeholder in the text"
            )

        padding = kwargs.get("padding", False)
        if padding or len(all_ids) > 1:
            encoded = self.tokenizer.pad({"input_ids": all_ids}, padding=padding or "longest")
            data: dict[str, Any] = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        else:
            data = {"input_ids": all_ids, "attention_mask": [[1] * len(ids) for ids in all_ids]}
        device = kwargs.get("device")
        if tiles:
            data["pixel_values"] = self.pixels(tiles).to(device) if device else self.pixels(tiles)
        if frames:
            data["pixel_values_videos"] = self.pixels(frames).to(device) if device else self.pixels(frames)
        out = BatchFeature(data=data, tensor_type=return_tensors)
        if any(b is not None for b in block_sizes):
            out["block_sizes"] = block_sizes  # python ints: SGLang slices tiles with them
        return out

    def expand(
        self, text: str, image_blocks: list[int], video_blocks: list[int], add_special_tokens: bool, videos: bool
    ) -> list[int]:
        """Tokenize ``text`` and replace its i-th image placeholder by ``image_blocks[i]`` image tokens and its j-th
        video placeholder by ``video_blocks[j]`` frames of ``tokens_per_tile`` video tokens, each block between
        the encoder's start and end tokens."""
        ids = list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        n_image_ids, n_video_ids = ids.count(self.image_token_id), ids.count(self.video_token_id)
        if n_image_ids != len(image_blocks) or n_video_ids != len(video_blocks):
            raise ValueError(
                f"the tokenizer turned {len(image_blocks)} image and {len(video_blocks)} video placeholder(s) into "
                f"{n_image_ids} and {n_video_ids} token(s); {self.image_token} / {self.video_token} must be single "
                "special tokens"
            )
        image_start, image_end = self.encoder_token_ids(self.image_encoder, "image") if image_blocks else ([], [])
        video_start, video_end = self.encoder_token_ids(self.video_encoder, "video") if videos else ([], [])
        image_queue, video_queue = deque(image_blocks), deque(video_blocks)
        out: list[int] = []
        for tid in ids:
            if tid == self.image_token_id:
                out += image_start + [tid] * image_queue.popleft() + image_end
            elif tid == self.video_token_id:
                out += (video_start + [tid] * self.tokens_per_tile + video_end) * video_queue.popleft()
            else:
                out.append(tid)
        return out
