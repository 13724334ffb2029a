"""Export-ready torch modules: the dynamic-S2 merge as one traceable graph, and quantized-projector handling.

``S2Merge`` computes exactly ``merge_features_for_dynamic_s2`` followed by ``split_chessboard`` and the
``b c h w -> b (h w) c`` rearrange of ``encode_images``, written with reshapes, permutes and matmuls so that
the last scale's block size can be a dynamic axis of its input (``[rows, cols, T, C]``). Area interpolation
(``F.interpolate(mode="area")`` = adaptive average pooling) is separable, so it is two matmuls with
averaging matrices built in the graph from the (symbolic) sizes. Maps stay channels-last (``(H, W, C)``, as
the tower emits them): every permute then moves whole C-vectors, where a channels-first map (PyTorch's
layout) needs a full element-wise transpose back at the end, the slowest op of the graph on onnxruntime CPU.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DequantLinear",
    "S2Merge",
    "area_matrix",
    "area_resize",
    "dequantize_reference",
    "is_quantized_linear",
    "map_to_tiles",
    "replace_quantized_linears",
    "tiles_to_map",
]


# ---------------------------------------------------------------------------- S2 numerics (traceable)
def area_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """(out_size, in_size) float32 averaging matrix of 1-D adaptive average pooling.

    Row i averages inputs [floor(i*in/out), ceil((i+1)*in/out)), PyTorch's ``adaptive_avg_pool`` bins.
    """
    i = torch.arange(out_size)
    start = (i * in_size) // out_size  # (out,)
    end = ((i + 1) * in_size + out_size - 1) // out_size  # (out,)
    j = torch.arange(in_size)
    mask = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])  # (out, in)
    return mask.to(torch.float32) / (end - start).to(torch.float32)[:, None]


def area_resize(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """``F.interpolate`` (mode="area", in float32, cast back) of a channels-last map: (H, W, C) -> (out_h, out_w, C)."""
    h, w, c = x.shape
    rows = area_matrix(out_h, h)  # (out_h, H)
    cols = area_matrix(out_w, w)  # (out_w, W)
    y = torch.matmul(rows, x.to(torch.float32).reshape(h, w * c)).reshape(out_h, w, c)  # (out_h, W, C)
    return torch.matmul(cols, y).to(x.dtype)  # (out_w, W) @ (out_h, W, C) -> (out_h, out_w, C)


def tiles_to_map(x: torch.Tensor, side: int) -> torch.Tensor:
    """``merge_chessboard`` of one image, channels-last: x (rows, cols, side*side, C) -> (rows*side, cols*side, C)."""
    rows, cols, _, c = x.shape
    x = x.reshape(rows, cols, side, side, c)  # (rows, cols, h, w, C)
    return x.permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, c)


def map_to_tiles(x: torch.Tensor, side: int) -> torch.Tensor:
    """``split_chessboard`` into side x side tiles + ``b c h w -> b (h w) c``:
    (H, W, C) -> (H/side * W/side, side^2, C)."""
    h, w, c = x.shape
    rows, cols = h // side, w // side
    x = x.reshape(rows, side, cols, side, c).permute(0, 2, 1, 3, 4)  # (rows, cols, h, w, C)
    return x.reshape(rows * cols, side * side, c)


class S2Merge(nn.Module):
    """Per-scale tile features of one image -> its multi-scale features split into the output block.

    forward(features_0, ..., features_{S-2}, features_last):
        features_i (i < S-1): (n_i * n_i, T, C), n_i = scales[i] / scales[0] (1 tile at 448, 4 at 896);
        features_last: (rows, cols, T, C), the last scale's tiles row-major; its first two dims ARE the block size.
    Returns (nb, T, S*C): the block of the ``resize_output_to_scale_idx`` scale ((rows, cols) for -1), channels
    in ascending scale order, tokens (h w) row-major, i.e. what ``encode_images`` feeds the projector.
    """

    def __init__(self, scales: list[int], resize_output_to_scale_idx: int, tokens_per_tile: int) -> None:
        super().__init__()
        side = math.isqrt(tokens_per_tile)
        if side * side != tokens_per_tile:
            raise ValueError(f"S2 needs a square token grid per tile, got {tokens_per_tile} tokens")
        if len(scales) < 2 or any(s % scales[0] for s in scales):
            raise ValueError(f"S2 scales must be >= 2 multiples of the first, got {scales}")
        self.scales = list(scales)
        self.side = side
        self.grid = [s // scales[0] for s in scales[:-1]]  # tiles per side of the fixed scales
        self.idx = resize_output_to_scale_idx % len(scales)

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        *fixed, last = features
        maps = [
            tiles_to_map(f.reshape(n, n, f.shape[-2], f.shape[-1]), self.side)
            for f, n in zip(fixed, self.grid, strict=True)
        ] + [tiles_to_map(last, self.side)]  # each (H_i, W_i, C)
        out_h, out_w = maps[self.idx].shape[:2]
        resized = [m if i == self.idx else area_resize(m, out_h, out_w) for i, m in enumerate(maps)]
        return map_to_tiles(torch.cat(resized, dim=-1), self.side)  # (nb, T, S*C)


# ---------------------------------------------------------------------------- quantized projector
def is_quantized_linear(module: nn.Module) -> bool:
    """Duck-typed: the project's quantized linears expose ``qtensor()`` (and ``dequantize_weight``)."""
    return callable(getattr(module, "qtensor", None))


class DequantLinear(nn.Module):
    """A linear whose weight is stored as integer codes and dequantized in the graph.

    Buffers (ONNX initializers): ``qweight`` (N, K) uint8 codes, ``zeros`` and ``scales`` (N, K/G, 1) float32
    (exact copies of the integer zero points and the stored scales), ``bias`` (N,) or absent. ``w = (q - z) * s``
    is computed in float32 and rounded once to the activation dtype, as ``QuantLinear.dequantize_weight`` and
    its reference backend do; then ``F.linear``.
    """

    def __init__(self, module: nn.Module, compute_dtype: torch.dtype) -> None:
        super().__init__()
        qt = module.qtensor()
        n, k = qt.q.shape
        self.in_features, self.out_features = k, n
        self.bits = int(qt.bits)
        self.group_size = k if qt.group_size == -1 else int(qt.group_size)
        self.register_buffer("qweight", qt.q.detach().to(torch.uint8).cpu().contiguous())
        self.register_buffer("zeros", qt.zero.detach().to(torch.float32).cpu().unsqueeze(-1).contiguous())
        self.register_buffer("scales", qt.scale.detach().to(torch.float32).cpu().unsqueeze(-1).contiguous())
        bias = qt.bias if qt.bias is not None else getattr(module, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype).cpu().contiguous())

    def weight(self) -> torch.Tensor:
        n, k, g = self.out_features, self.in_features, self.group_size
        q = self.qweight.to(torch.float32).reshape(n, k // g, g)  # (N, K/G, G)
        return ((q - self.zeros) * self.scales).reshape(n, k)  # (N, K) float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        return F.linear(x, self.weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}")


def _replace(module: nn.Module, make: callable) -> tuple[nn.Module, int]:
    """Copy of ``module`` with every quantized linear replaced by ``make(child)``; returns (copy, count)."""
    if is_quantized_linear(module):
        return make(module), 1
    module = copy.deepcopy(module)
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if is_quantized_linear(child):
                setattr(parent, name, make(child))
                count += 1
    return module, count


def replace_quantized_linears(module: nn.Module, compute_dtype: torch.dtype) -> tuple[nn.Module, int]:
    """Copy of a projector whose quantized linears become :class:`DequantLinear` (codes kept as integers)."""
    return _replace(module, lambda m: DequantLinear(m, compute_dtype))


def dequantize_reference(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Copy of a projector whose quantized linears become float ``nn.Linear`` holding ``dequantize_weight(dtype)``:
    the PyTorch reference the exported projector is verified against."""

    def make(m: nn.Module) -> nn.Linear:
        weight = m.dequantize_weight(dtype) if hasattr(m, "dequantize_weight") else m.qtensor().dequantize(dtype)
        qt = m.qtensor()
        bias = qt.bias if qt.bias is not None else getattr(m, "bias", None)
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            lin.weight.copy_(weight.to(dtype))
            if bias is not None:
                lin.bias.copy_(bias.to(dtype))
        return lin.to(dtype)

    return _replace(module, make)[0]
