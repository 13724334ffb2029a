"""W8A8 numerics as pure functions: int8 weights per output channel, int8 activations per token, SmoothQuant.

    weights:      W (N, K) -> q_w = clamp(round(W / s_w), -127, 127),  s_w = max_k |W[n, k]| / 127    (N, 1)
    activations:  x (T, K) -> q_x = clamp(round(x / s_x), -127, 127),  s_x = max_k |x[t, k]| / 127    (T, 1)
    product:      y = (q_x @ q_w^T) * s_x * s_w^T + bias               (the int32 accumulation is exact)
    smoothing:    m_k = max|x_k|^alpha / max|W_k|^(1 - alpha); x / m and W * m give the same product in float,
                  and move the activations' outlier channels into the weights, which quantize per row.

Symmetric, no zero points (compressed-tensors ``int-quantized``: weight strategy "channel", input activations
strategy "token", dynamic). ``torch._int_mm`` runs the int8 product on CPU (oneDNN) and CUDA; the reference path
computes the same integers in float64 (exact: |sum| <= K * 127^2 < 2^53).
"""

from __future__ import annotations

import torch

__all__ = [
    "INT8_MAX",
    "int8_matmul",
    "quantize_tokens",
    "quantize_weight",
    "smooth_factors",
    "w8a8_linear",
]

INT8_MAX = 127
_EPS = 1e-8


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel. w: (N, K) -> (q (N, K) int8, scale (N, 1) float32)."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp(min=_EPS)
    q = torch.round(wf / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic, per token (row). x: (T, K) -> (q (T, K) int8, scale (T, 1) float32)."""
    scale = (x.abs().amax(dim=1, keepdim=True).float() / INT8_MAX).clamp(min=_EPS)
    q = x.float() / scale  # a new tensor: rounded and clamped in place
    return q.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def int8_matmul(qx: torch.Tensor, qw: torch.Tensor, exact_reference: bool = False,
                qw_t: torch.Tensor | None = None) -> torch.Tensor:
    """q_x @ q_w^T in int32. qx: (T, K) int8, qw: (N, K) int8 (qw_t: its (K, N) contiguous transpose, when kept)
    -> (T, N) int32.

    ``torch._int_mm`` where it runs (CPU; CUDA for T > 16 and K, N multiples of 8), else (or with
    ``exact_reference``) float64, which holds every such sum exactly."""
    if not exact_reference:
        t, k = qx.shape
        ok = qx.device.type == "cpu" or (t > 16 and k % 8 == 0 and qw.shape[0] % 8 == 0)
        if ok and hasattr(torch, "_int_mm"):
            return torch._int_mm(qx.contiguous(), qw.t().contiguous() if qw_t is None else qw_t)
    return (qx.double() @ qw.double().t()).to(torch.int32)


def w8a8_linear(x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                exact_reference: bool = False, qw_t: torch.Tensor | None = None) -> torch.Tensor:
    """y = dynamic-int8(x) @ int8(W)^T, rescaled, + bias, in x's dtype. x: (..., K), qw: (N, K), w_scale: (N, 1)."""
    shape = x.shape
    qx, x_scale = quantize_tokens(x.reshape(-1, shape[-1]))
    y = int8_matmul(qx, qw, exact_reference, qw_t).float()  # (T, N), exact integers; rescaled in place
    y.mul_(x_scale).mul_(w_scale.float().view(1, -1))
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*shape[:-1], qw.shape[0])


def smooth_factors(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors m (x / m, W * m). x_absmax: (K,) over the calibration tokens,
    w_absmax: (K,) over the output rows of every linear sharing the input -> (K,) float32, clamped away from 0."""
    xa = x_absmax.float().clamp(min=1e-5)
    wa = w_absmax.float().clamp(min=1e-5)
    return (xa.pow(alpha) / wa.pow(1 - alpha)).clamp(min=1e-5)
