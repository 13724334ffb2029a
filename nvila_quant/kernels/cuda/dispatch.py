"""CUDA backend of QuantLinear: which kernel runs a layer for a call, and the per-layer view of its weights.

Layers whose N, K and group size are multiples of 32 take the "mma" layout (:mod:`.layout`, repacked once at load,
scales and zeros transposed) and the tensor-core skinny GEMM for up to ``mma_max_tokens`` tokens; other 4-bit
layers with K and group multiples of 32 keep nibble rows and a GEMV for up to :data:`GEMV_MAX_TOKENS`. More tokens
run a dequantize kernel + cuBLAS (``NVILA_QUANT_CUDA_GEMM=fused``: the tiled mma GEMM there instead). The mma
kernels are checked against torch on the first layer of each device (:func:`mma_self_check`); if they disagree the
layout is not used there and the reason is logged. Eager calls launch directly (the weights were checked once when
prepared; a custom op's dispatch costs more than the GEMV at one token); under ``torch.compile`` they go through the
registered ops (:mod:`.ops`). Knobs: :class:`~nvila_quant.kernels.cuda.settings.CudaSettings`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from nvila_quant.kernels.build import BuildError
from nvila_quant.kernels.cuda import ops  # noqa: F401 (registers torch.ops.nvila_quant.w4a16_*)
from nvila_quant.kernels.cuda.layout import mma_layout_reason, mma_pack
from nvila_quant.kernels.cuda.native import (
    MIN_CAPABILITY,
    check_weights,
    device_library,
    library,
    mma_dequant_into,
    mma_launch,
    rows_dequant_into,
    rows_launch,
)
from nvila_quant.kernels.cuda.ops import aligned
from nvila_quant.kernels.cuda.settings import cuda_settings
from nvila_quant.numerics.nibbles import pack_nibbles

__all__ = [
    "GEMV_MAX_TOKENS",
    "CudaWeights",
    "cuda_linear",
    "cuda_support",
    "mma_reason",
    "mma_self_check",
    "prepare_cuda",
]

# Nibble-row layers: the fused GEMV up to this many tokens (its time grows with tokens), dequantize + cuBLAS above.
# Measurements: benchmarks/README.md, "CUDA dispatch".
GEMV_MAX_TOKENS = 4


def _device_reason(device_index: int) -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    return _built_reason(device_index)


@functools.cache
def _built_reason(device_index: int) -> str | None:
    """Why the kernels cannot run on this device (checked, and built, once per device), or None."""
    cap = torch.cuda.get_device_capability(device_index)
    if cap < MIN_CAPABILITY:
        return f"compute capability {cap[0]}.{cap[1]} < 8.0 (bf16 tensor cores)"
    try:
        library(device_index)
    except (BuildError, OSError) as e:
        return f"the CUDA kernels did not build or load: {e}"
    return None


def cuda_support(bits: int, group: int, out_features: int, in_features: int,
                 x_dtype: torch.dtype | None = None, device_index: int | None = None) -> str | None:
    """None when the CUDA kernels can run this layer, else the reason (shape, dtype, device, build)."""
    if bits != 4:
        return f"bits={bits} (the W4A16 kernels need 4)"
    if in_features % 32:
        return f"in_features={in_features} is not a multiple of 32"
    if group % 32:
        return f"group_size={group} is not a multiple of 32"
    if x_dtype is not None and x_dtype not in (torch.float16, torch.bfloat16):
        return f"activations are {x_dtype} (the kernels take fp16/bf16)"
    if device_index is None:
        device_index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return _device_reason(device_index)


@dataclass
class CudaWeights:
    """qweight (N, K/8) int32 (a view of the module's q), all contiguous on one device (checked once, in
    :func:`prepare_cuda`); ``biases`` caches the bias per dtype. ``layout`` "rows": nibble rows, scales (N, K/G) fp32,
    zeros (N, K/G) uint8; "mma": the mma layout, scales (K/G, N) fp32 and zeros (K/G, N) uint8 (transposed)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group: int
    biases: dict = field(default_factory=dict)
    layout: str = "rows"

    def bias_for(self, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        if bias is None:
            return None
        cached = self.biases.get(dtype)
        if cached is None or cached.device != bias.device:
            cached = self.biases[dtype] = bias.to(dtype).contiguous()
        return cached


def prepare_cuda(qnib: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, in_features: int,
                 layout: str = "rows") -> CudaWeights:
    """The kernels' view of a layer: no copy of the weights (``qnib``, nibble rows or the mma layout as
    ``layout`` says, is already the kernels' word layout); scales in fp32 (transposed for "mma")."""
    if qnib.shape[1] * 2 != in_features or in_features % 32:
        raise ValueError(f"CUDA kernels need 4-bit nibble rows with in_features % 32 == 0, got {tuple(qnib.shape)}")
    if layout == "mma":
        reason = mma_layout_reason(4, qnib.shape[0], in_features, group)
        if reason:
            raise ValueError(f"the mma layout does not take this layer: {reason}")
        scales, zeros = scale.float().t().contiguous(), zero.t().contiguous()
    elif layout == "rows":
        scales, zeros = scale.float().contiguous(), zero.contiguous()
    else:
        raise ValueError(f"layout must be 'rows' or 'mma', got {layout!r}")
    weights = CudaWeights(qnib.contiguous().view(torch.int32), scales, zeros, group, layout=layout)
    check_weights(weights.qweight, weights.scales, weights.zeros, group, weights.qweight.device, layout)
    return weights




def _dequantize(weights: CudaWeights, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight in fp16/bf16, exactly the reference's (q - z) * s rounded once (either layout)."""
    q = weights.qweight
    w = torch.empty(q.shape[0], q.shape[1] * 8, dtype=dtype, device=q.device)
    into = mma_dequant_into if weights.layout == "mma" else rows_dequant_into
    return into(device_library(q), q, weights.scales, weights.zeros, weights.group, w)


def cuda_linear(x: torch.Tensor, weights: CudaWeights, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) fp16/bf16 on CUDA -> (..., N). mma layout: the skinny tensor-core kernel up to ``mma_max_tokens``
    tokens; nibble rows: the fused GEMV up to GEMV_MAX_TOKENS; more tokens: dequantize + cuBLAS
    (``NVILA_QUANT_CUDA_GEMM=fused``: the tiled mma GEMM there, or the wmma GEMM for nibble rows)."""
    shape = x.shape
    b = weights.bias_for(bias, x.dtype)
    x2 = x.reshape(-1, shape[-1])
    m = x2.shape[0]
    compiling = torch.compiler.is_compiling()  # registered ops then, so the call traces
    mma = weights.layout == "mma"
    settings = cuda_settings()
    skinny = m <= (settings.mma_max_tokens if mma else GEMV_MAX_TOKENS)
    fused = skinny or settings.gemm == "fused"
    tiled = mma and not skinny
    registered = torch.ops.nvila_quant
    if not fused:
        if compiling:
            dequant = registered.w4a16_mma_dequant if mma else registered.w4a16_dequant
            w = dequant(weights.qweight, weights.scales, weights.zeros, weights.group, x.dtype)
        else:
            w = _dequantize(weights, x.dtype)
        y = torch.nn.functional.linear(x2, w, b)
    elif compiling:
        linear = ((registered.w4a16_mma_gemm if tiled else registered.w4a16_mma_linear) if mma
                  else registered.w4a16_linear)
        y = linear(x2, weights.qweight, weights.scales, weights.zeros, b, weights.group)
    else:
        x2 = aligned(x2)
        y = torch.empty(m, weights.qweight.shape[0], dtype=x.dtype, device=x.device)
        if mma:
            mma_launch(device_library(x2), x2, weights.qweight, weights.scales, weights.zeros, b, weights.group, y,
                       weights_checked=True, tiled=tiled)
        else:
            rows_launch(x2, weights.qweight, weights.scales, weights.zeros, b, weights.group, y, weights_checked=True)
    return y.reshape(*shape[:-1], y.shape[-1])


def mma_reason(bits: int, out_features: int, in_features: int, group: int, zero: torch.Tensor) -> str | None:
    """None when a CUDA layer should take the mma layout, else why not (shape, zero points, self-check)."""
    reason = mma_layout_reason(bits, out_features, in_features, group)
    if reason is None and int(zero.max()) > 15:
        reason = "zero points above 15"
    if reason is None and zero.is_cuda:
        reason = mma_self_check(zero.device.index if zero.device.index is not None else torch.cuda.current_device())
    return reason


@functools.cache
def mma_self_check(device_index: int) -> str | None:
    """Known-answer test of the mma kernels on this device (once): None if they match torch, else why not."""
    device = torch.device("cuda", device_index)
    gen = torch.Generator().manual_seed(0)
    n, k, group = 96, 512, 64
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    zero = torch.randint(0, 16, (n, k // group), dtype=torch.uint8, generator=gen)
    scale = torch.rand(n, k // group, generator=gen) * 0.02 + 0.001
    w = (q.view(n, k // group, group).float() - zero[..., None].float()) * scale[..., None]
    weights = prepare_cuda(mma_pack(pack_nibbles(q)).to(device), scale.to(device), zero.to(device), group, k, "mma")
    try:
        lib = library(device_index)
        for dtype in (torch.float16, torch.bfloat16):
            ref_w = w.reshape(n, k).to(dtype)
            got_w = mma_dequant_into(lib, weights.qweight, weights.scales, weights.zeros, group,
                                     torch.empty(n, k, dtype=dtype, device=device))
            if not torch.equal(got_w.cpu(), ref_w):
                return f"self-check: the mma dequantize kernel disagrees with torch ({dtype})"
            for m, ksplit, warps, tiled in ((1, 1, 16, False), (3, 2, 8, False), (11, 3, 16, False),
                                            (40, 2, 8, False), (40, 1, None, True), (150, 3, None, True)):
                x = torch.randn(m, k, generator=gen).to(dtype)
                ref = x.float() @ w.reshape(n, k).T
                out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
                mma_launch(lib, x.to(device), weights.qweight, weights.scales, weights.zeros, None, group, out, ksplit,
                           warps=warps, tiled=tiled)
                err = (out.float().cpu() - ref).abs().max().item()
                if not err <= 0.02 * ref.abs().max().item():
                    kind = "tiled GEMM" if tiled else "skinny kernel"
                    return f"self-check: the mma {kind} disagrees with torch (M={m}, {dtype}, max error {err:.3g})"
        torch.cuda.synchronize(device)
    except (RuntimeError, ValueError) as e:
        return f"self-check failed: {e}"
    return None
