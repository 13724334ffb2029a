"""Vision side: the SigLIP tower with NVILA's feature selection, and the dynamic-S2 split/merge numerics.

The S2 functions are pure (tensors in, tensors out) so the ONNX export and the tests use them directly.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from einops import rearrange
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from nvila_quant.errors import CheckpointError, MediaError

__all__ = [
    "TowerGeometry",
    "VisionTower",
    "load_image_processor",
    "merge_chessboard",
    "merge_features_for_dynamic_s2",
    "split_chessboard",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- S2 numerics
def split_chessboard(x: torch.Tensor, num_split_h: int, num_split_w: int) -> torch.Tensor:
    """Cut each map into nh x nw sub-maps, row-major, stacked on the batch dim.

    x: (B, C, H, W) -> (nh*nw*B, C, H/nh, W/nw); sub-map (i, j) of every image is at [(i*nw+j)*B : ...].
    """
    b, c, h, w = x.shape
    if h % num_split_h or w % num_split_w:
        raise ValueError(f"cannot split a {h}x{w} map into {num_split_h}x{num_split_w} equal tiles")
    th, tw = h // num_split_h, w // num_split_w
    return torch.cat(
        [x[:, :, i * th : (i + 1) * th, j * tw : (j + 1) * tw] for i in range(num_split_h) for j in range(num_split_w)],
        dim=0,
    )


def merge_chessboard(x: torch.Tensor, num_split_h: int, num_split_w: int) -> torch.Tensor:
    """Inverse of :func:`split_chessboard`.

    x: (nh*nw*b, C, h, w), or (nh*nw*b, h*w, C) with a square token grid -> (b, C, nh*h, nw*w).
    """
    if x.dim() == 3:
        n = x.shape[1]
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"merge_chessboard needs a square token grid, got {n} tokens")
        x = rearrange(x, "b (h w) c -> b c h w", h=side, w=side)
    tiles = num_split_h * num_split_w
    if x.shape[0] % tiles:
        raise ValueError(f"{x.shape[0]} tiles cannot be merged into a {num_split_h}x{num_split_w} board")
    b = x.shape[0] // tiles
    rows = [
        torch.cat([x[(i * num_split_w + j) * b : (i * num_split_w + j + 1) * b] for j in range(num_split_w)], dim=-1)
        for i in range(num_split_h)
    ]
    return torch.cat(rows, dim=-2)


def merge_features_for_dynamic_s2(
    image_features: torch.Tensor,
    block_sizes: list[tuple[int, int] | None],
    scales: list[int],
    resize_output_to_scale_idx: int = -1,
) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Merge per-scale tile features into one multi-scale map per image.

    image_features: (total_tiles, h*w, C), tiles of each image in order: scale 0 (1 tile), scale 1
    ((s1/s0)^2 tiles), ..., last scale (rows*cols tiles). ``block_sizes[i]`` is (rows, cols) of image i's
    last scale, or None for a single-448-tile image (its map is repeated over all scales).

    Returns ([(1, len(scales)*C, H, W) per image], [new block size per image]); every scale's map is
    resized (area, in float32) to the map of ``resize_output_to_scale_idx`` and concatenated in
    ascending scale order.
    """
    base = scales[0]
    idx = resize_output_to_scale_idx % len(scales)
    merged: list[torch.Tensor] = []
    new_block_sizes: list[tuple[int, int]] = []
    cnt = 0
    for block_size in block_sizes:
        if block_size is None:
            cur = image_features[cnt : cnt + 1]
            cur = rearrange(cur, "1 (h w) c -> 1 c h w", h=math.isqrt(cur.shape[1]))
            merged.append(cur.repeat(1, len(scales), 1, 1))
            new_block_sizes.append((1, 1))
            cnt += 1
            continue
        per_scale = []
        for scale in scales[:-1]:
            n = scale // base
            per_scale.append(merge_chessboard(image_features[cnt : cnt + n * n], n, n))  # (1, C, H_s, W_s)
            cnt += n * n
        rows, cols = block_size
        per_scale.append(merge_chessboard(image_features[cnt : cnt + rows * cols], rows, cols))
        cnt += rows * cols
        size = per_scale[idx].shape[-2:]
        merged.append(
            torch.cat(
                [F.interpolate(f.to(torch.float32), size=size, mode="area").to(f.dtype) for f in per_scale], dim=1
            )
        )
        if idx == len(scales) - 1:
            new_block_sizes.append((rows, cols))
        else:
            new_block_sizes.append((scales[idx] // base, scales[idx] // base))
    if cnt != image_features.shape[0]:
        raise ValueError(
            f"block sizes {block_sizes} account for {cnt} tiles but {image_features.shape[0]} tile features were given"
        )
    return merged, new_block_sizes


# ---------------------------------------------------------------------------- image processor
def load_image_processor(folder: str | os.PathLike, image_size: int):
    """SigLIP's PIL image processor from ``vision_tower/``, with its size forced to ``image_size``."""
    cls = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
    folder = Path(folder)
    if (folder / "preprocessor_config.json").is_file():
        processor = cls.from_pretrained(str(folder))
    else:
        logger.warning("%s has no preprocessor_config.json; using SigLIP defaults (mean = std = 0.5)", folder)
        processor = cls(image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3, rescale_factor=1 / 255)
    processor.size = {"height": image_size, "width": image_size}
    return processor


# ---------------------------------------------------------------------------- the tower
class TowerGeometry:
    """Sizes every vision tower derives from its ``config`` (SiglipVisionConfig) and ``scales`` (dynamic S2)."""

    config: SiglipVisionConfig
    scales: list[int] | None

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def num_patches(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    @property
    def hidden_size(self) -> int:
        """Width of the features the projector sees (x number of scales under dynamic S2)."""
        return self.config.hidden_size * (len(self.scales) if self.scales else 1)


class VisionTower(TowerGeometry, nn.Module):
    """SigLIP vision tower returning NVILA's selected features (``hidden_states[select_layer]``).

    Only the layers up to the selected one run; ``post_layernorm`` and the pooling head never do.
    ``vision_tower`` is a real ``SiglipVisionModel`` whose ``state_dict`` matches ``vision_tower/``.
    """

    def __init__(
        self,
        model: SiglipVisionModel,
        select_layer: int = -2,
        select_feature: str = "cls_patch",
        scales: list[int] | None = None,
        resize_output_to_scale_idx: int = -1,
    ) -> None:
        super().__init__()
        self.vision_tower = model
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.scales = list(scales) if scales else None  # set for dynamic S2
        self.resize_output_to_scale_idx = resize_output_to_scale_idx
        self.image_processor = None
        n_layers = self.config.num_hidden_layers
        if not -(n_layers + 1) <= select_layer <= n_layers:
            raise CheckpointError(
                f"mm_vision_select_layer={select_layer} is out of range for a vision tower with {n_layers} layers"
            )
        self.num_layers_used = select_layer % (n_layers + 1)  # hidden_states[i] = output of layer i

    @property
    def config(self) -> SiglipVisionConfig:
        return self.vision_tower.config

    @property
    def vit(self) -> nn.Module:
        """The module holding ``embeddings`` and ``encoder`` (``vision_model`` on older transformers)."""
        return getattr(self.vision_tower, "vision_model", self.vision_tower)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vision_tower.parameters()).device

    def check_tiles(self, images: torch.Tensor) -> None:
        size = self.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (self.config.num_channels, size, size):
            raise MediaError(
                f"vision tower takes pixel tiles of shape (num_tiles, {self.config.num_channels}, {size}, {size}), "
                f"got {tuple(images.shape)}"
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, S, S) -> selected features (N, (S/patch)^2, C_vision)."""
        self.check_tiles(images)
        hidden_states = self.vit.embeddings(images.to(device=self.device, dtype=self.dtype))
        for layer in self.vit.encoder.layers[: self.num_layers_used]:
            out = layer(hidden_states, None)
            hidden_states = out[0] if isinstance(out, tuple) else out
        if self.select_feature == "patch":
            hidden_states = hidden_states[:, 1:]  # only meaningful for towers with a CLS token
        return hidden_states.to(images.dtype) if images.is_floating_point() else hidden_states
