"""Quantization numerics as pure functions (tensors in, tensors out).

Reference formula (llm-awq ``pseudo_quantize_tensor``), asymmetric uint, group-wise over the input dim:
    W -> [-1, G];  s = (max - min).clamp(min=1e-5) / (2^b - 1);  z = clamp(-round(min / s), 0, 2^b - 1)
    q = clamp(round(W / s) + z, 0, 2^b - 1);  W' = (q - z) * s          (torch.round: half to even)
Symmetric: s = absmax / (2^(b-1) - 1), signed q in [-2^(b-1), 2^(b-1) - 1]; stored canonically as unsigned
q + 2^(b-1) with zero point 2^(b-1), so every format and kernel sees the same (q - z) * s.

| group_size | block per scale |
|---|---|
| G > 0 | (1, G): one scale per output channel and group of G input channels |
| -1 | (1, K): one scale per output channel |
"""

from __future__ import annotations

import torch

__all__ = ["compute_qparams", "dequantize", "group_count", "pseudo_quantize", "quantize"]


def group_count(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else in_features // group_size


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w: (N, K) -> (N * K/G, G)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(w.shape)}")
    n, k = w.shape
    g = k if group_size == -1 else group_size
    if g <= 0 or k % g:
        raise ValueError(f"group_size must divide in_features (got in_features={k}, group_size={group_size})")
    return w.reshape(-1, g)


def compute_qparams(
    w: torch.Tensor, bits: int = 4, group_size: int = 128, zero_point: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) of a weight. w: (N, K) -> scale (N, K/G) float32, zero (N, K/G) int32."""
    n = w.shape[0]
    x = _grouped(w.float(), group_size)
    if zero_point:
        max_int = 2**bits - 1
        wmax, wmin = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
        scale = (wmax - wmin).clamp(min=1e-5) / max_int
        zero = (-torch.round(wmin / scale)).clamp(0, max_int)
    else:
        max_int = 2 ** (bits - 1) - 1
        scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / max_int
        zero = torch.full_like(scale, 2 ** (bits - 1))
    return scale.reshape(n, -1), zero.reshape(n, -1).to(torch.int32)


def quantize(
    w: torch.Tensor, bits: int = 4, group_size: int = 128, zero_point: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w: (N, K) -> (q (N, K) uint8 in [0, 2^b - 1], scale (N, K/G) float32, zero (N, K/G) int32)."""
    scale, zero = compute_qparams(w, bits, group_size, zero_point)
    x = _grouped(w.float(), group_size)
    s, z = scale.reshape(-1, 1), zero.reshape(-1, 1).float()
    if zero_point:
        q = (torch.round(x / s) + z).clamp(0, 2**bits - 1)
    else:
        q = torch.round(x / s).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) + z
    return q.reshape(w.shape).to(torch.uint8), scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """(q - z) * s. q: (N, K) integer, scale/zero: (N, K/G) -> (N, K) in scale's dtype (fp32 math)."""
    n, k = q.shape
    g = k if group_size == -1 else group_size
    x = q.reshape(-1, g).float() - zero.reshape(-1, 1).float()
    return (x * scale.reshape(-1, 1).float()).reshape(n, k).to(scale.dtype)


def pseudo_quantize(w: torch.Tensor, bits: int = 4, group_size: int = 128, zero_point: bool = True) -> torch.Tensor:
    """Quantize then dequantize (the reference's ``pseudo_quantize_tensor``), in w's dtype."""
    q, scale, zero = quantize(w, bits, group_size, zero_point)
    return dequantize(q, scale, zero, group_size).to(w.dtype)
