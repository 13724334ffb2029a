"""CUDA backend: the project's W4A16 kernels (``w4a16.cu``, ``w4a16_mma.cu``) built with nvcc alone, called as torch ops.

The library is compiled on first use for the GPU present (``-gencode arch=compute_XY,code=sm_XY``) and cached
by source hash and arch (kernels/build.py). It is called through ctypes on the current CUDA stream and wrapped
in ``torch.library.custom_op`` ops, so it works inside ``torch.compile`` (opaque op with a fake impl) and CUDA
graph capture (no allocation, sync or host round trip inside the launch).

    torch.ops.nvila_quant.w4a16_linear(x, qweight, scales, zeros, bias, group) -> out
    torch.ops.nvila_quant.w4a16_linear_out(x, qweight, scales, zeros, bias, group, out) -> None  (writes out)

x (M, K) fp16/bf16; qweight (N, K/8) int32 (nibble rows viewed as int32); scales (N, K/G) fp32;
zeros (N, K/G) uint8; bias (N,) like x or None; out (M, N) like x.

Layers whose N, K and group size are multiples of 32 take the "mma" layout instead (``layout.py``: repacked once
at load, scales and zeros transposed) and the tensor-core skinny GEMM of ``w4a16_mma.cu`` for up to
``MMA_MAX_TOKENS`` tokens, its dequantize kernel + cuBLAS above:

    torch.ops.nvila_quant.w4a16_mma_linear(x, qweight, scales_t, zeros_t, bias, group) -> out
    torch.ops.nvila_quant.w4a16_mma_dequant(qweight, scales_t, zeros_t, group, dtype) -> w (N, K)

The mma kernels are checked against torch on the first layer of each device (a known-answer test); if they
disagree, the layout is not used there and the reason is logged.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nvila_quant.kernels.build import BuildError, build_shared_library, env_number
from nvila_quant.kernels.cuda.layout import mma_layout_reason

__all__ = [
    "CUDA_SOURCES",
    "MMA_MAX_TOKENS",
    "CudaWeights",
    "build_library",
    "cuda_linear",
    "cuda_support",
    "mma_reason",
    "nvcc_flags",
    "prepare_cuda",
]

CUDA_SOURCES = [Path(__file__).parent / "w4a16.cu", Path(__file__).parent / "w4a16_mma.cu"]
MIN_CAPABILITY = (8, 0)
# Up to this many tokens the mma-layout kernel runs (weights read once per 32 tokens); above, dequantize + cuBLAS.
MMA_MAX_TOKENS = int(env_number("NVILA_QUANT_CUDA_MMA_MAX_TOKENS", 32))
KSPLIT = int(env_number("NVILA_QUANT_CUDA_KSPLIT", 0))  # 0: chosen per call from the SM count
MMA_WARPS = int(env_number("NVILA_QUANT_CUDA_MMA_WARPS", 0))  # warps per CTA, 8 or 16; 0: 16 up to 16 tokens


def nvcc_flags(arch: str) -> list[str]:
    """nvcc flags for a shared library targeting ``arch`` (e.g. "80", "90")."""
    return ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-lineinfo",
            f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def build_library(arch: str) -> Path:
    return build_shared_library("nq_w4a16_sm" + arch, CUDA_SOURCES, "nvcc", nvcc_flags(arch), f"sm_{arch}")


@functools.cache
def _library(device_index: int) -> ctypes.CDLL:
    major, minor = torch.cuda.get_device_capability(device_index)
    lib = ctypes.CDLL(str(build_library(f"{major}{minor}")))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.nq_w4a16_linear.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int, ptr,
                                    ctypes.c_char_p, ctypes.c_int]
    lib.nq_w4a16_linear.restype = ctypes.c_int
    lib.nq_w4a16_dequant.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int, ptr, ctypes.c_char_p, ctypes.c_int]
    lib.nq_w4a16_dequant.restype = ctypes.c_int
    return declare_mma(lib)


def declare_mma(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Argument types of the mma-layout entry points (the CUDA library and its CPU simulation export the same)."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.nq_mma_linear.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_int,
                                  ctypes.c_int, ptr, ctypes.c_char_p, ctypes.c_int]
    lib.nq_mma_linear.restype = ctypes.c_int
    lib.nq_mma_gemm.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_int, ptr,
                                ctypes.c_char_p, ctypes.c_int]
    lib.nq_mma_gemm.restype = ctypes.c_int
    lib.nq_mma_dequant.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int, ptr, ctypes.c_char_p, ctypes.c_int]
    lib.nq_mma_dequant.restype = ctypes.c_int
    return lib


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
    if shutil.which("nvcc") is None:
        return "nvcc is not on PATH (needed once to build the kernels)"
    try:
        _library(device_index)
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
    _check_weights(weights.qweight, weights.scales, weights.zeros, group, weights.qweight.device, layout)
    return weights


def _check_weights(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                   device: torch.device, layout: str = "rows") -> None:
    n, k = qweight.shape[0], qweight.shape[1] * 8
    groups = (k // group, n) if layout == "mma" else (n, k // group)
    expect = {"qweight": ((n, k // 8), torch.int32), "scales": (groups, torch.float32),
              "zeros": (groups, torch.uint8)}
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        shape, dtype = expect[name]
        if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous() or t.device != device:
            raise ValueError(f"w4a16 ({layout} layout): {name} must be a contiguous {dtype} {shape} on {device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")


_ERRORS = threading.local()  # one reusable error-message buffer per thread


def _error_buffer() -> ctypes.Array:
    buf = getattr(_ERRORS, "buf", None)
    if buf is None:
        buf = _ERRORS.buf = ctypes.create_string_buffer(512)
    return buf


def _check_call(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    m, k = x.shape
    n = qweight.shape[0]
    if qweight.shape[1] * 8 != k:
        raise ValueError(f"w4a16_linear: x has K={k}, the weights K={qweight.shape[1] * 8}")
    if tuple(out.shape) != (m, n) or out.dtype != x.dtype or not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"w4a16_linear: out must be a contiguous {x.dtype} ({m}, {n}) on {x.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"w4a16_linear: x must be fp16 or bf16, got {x.dtype}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != x.dtype or not bias.is_contiguous()):
        raise ValueError(f"w4a16_linear: bias must be a contiguous {x.dtype} ({n},), got {bias.dtype} {tuple(bias.shape)}")


def _stream(t: torch.Tensor) -> int | None:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else None


def _device_library(t: torch.Tensor) -> ctypes.CDLL:
    return _library(t.device.index if t.device.index is not None else torch.cuda.current_device())


def _launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            bias: torch.Tensor | None, group: int, out: torch.Tensor, weights_checked: bool = False) -> None:
    """Nibble-row kernels (w4a16.cu) into ``out``."""
    m, k = x.shape
    if not weights_checked:
        _check_weights(qweight, scales, zeros, group, x.device)
    _check_call(x, qweight, bias, out)
    err = _error_buffer()
    rc = _device_library(x).nq_w4a16_linear(
        x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
        None if bias is None else bias.data_ptr(), out.data_ptr(), m, qweight.shape[0], k, group,
        0 if x.dtype == torch.float16 else 1, _stream(x), err, len(err),
    )
    if rc != 0:
        raise RuntimeError(f"w4a16_linear failed: {err.value.decode(errors='replace')}")


def mma_warps(m: int) -> int:
    """Warps per CTA of the mma kernel: 16 up to 16 tokens (more loads in flight per 32-row tile), else 8."""
    return MMA_WARPS if MMA_WARPS in (8, 16) and (MMA_WARPS == 8 or m <= 16) else (16 if m <= 16 else 8)


def mma_ksplit(m: int, n: int, k: int, device: torch.device, warps: int = 8, tiled: bool = False) -> int:
    """K slices for the skinny kernel (32-row CTAs of ``warps`` warps) or the tiled GEMM (128 x 128 tiles)
    (``NVILA_QUANT_CUDA_KSPLIT`` fixes it): 1 when the CTAs already give three quarters of one per SM (a split costs
    a second kernel), else enough slices for about one per SM; at most 16 slices, and at least one 32-wide chunk per
    warp (skinny) or 8 chunks per slice (tiled)."""
    chunks = k // 32
    if KSPLIT > 0:
        return max(1, min(KSPLIT, chunks))
    if device.type != "cuda":
        return 1
    if tiled:
        ctas, per_slice = -(-(n // 32) // 4) * -(-m // 128), 8
    else:
        ctas, per_slice = (n // 32) * (-(-m // 32) if m > 16 else 1), warps
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if 4 * ctas >= 3 * sms:
        return 1
    return max(1, min(16, chunks // per_slice, -(-sms // ctas)))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def mma_launch(lib: ctypes.CDLL, x: torch.Tensor, qweight: torch.Tensor, scales_t: torch.Tensor,
               zeros_t: torch.Tensor, bias: torch.Tensor | None, group: int, out: torch.Tensor,
               ksplit: int | None = None, weights_checked: bool = False, warps: int | None = None,
               tiled: bool = False) -> None:
    """mma-layout kernel (w4a16_mma.cu) into ``out``: the skinny GEMM, or with ``tiled`` the 128 x 128-tile GEMM;
    ``lib`` is the CUDA library or its CPU simulation."""
    m, k = x.shape
    n = qweight.shape[0]
    if not weights_checked:
        _check_weights(qweight, scales_t, zeros_t, group, x.device, "mma")
    _check_call(x, qweight, bias, out)
    if not tiled:
        warps = warps or mma_warps(m)
    ksplit = ksplit or mma_ksplit(m, n, k, x.device, warps or 8, tiled)
    partial = torch.empty(ksplit, m, n, dtype=torch.float32, device=x.device) if ksplit > 1 and m else None
    err = _error_buffer()
    args = (x.data_ptr(), qweight.data_ptr(), scales_t.data_ptr(), zeros_t.data_ptr(),
            None if bias is None else bias.data_ptr(), out.data_ptr(), None if partial is None else partial.data_ptr(),
            m, n, k, group, ksplit)
    tail = (0 if x.dtype == torch.float16 else 1, _stream(x), err, len(err))
    rc = lib.nq_mma_gemm(*args, *tail) if tiled else lib.nq_mma_linear(*args, warps, *tail)
    if rc != 0:
        raise RuntimeError(f"w4a16_mma_{'gemm' if tiled else 'linear'} failed: {err.value.decode(errors='replace')}")


def mma_dequant_into(lib: ctypes.CDLL, qweight: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor,
                     group: int, w: torch.Tensor) -> torch.Tensor:
    """The (N, K) fp16/bf16 weight, exactly the reference's, from the mma layout (into ``w``)."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    if tuple(w.shape) != (n, k) or w.dtype not in (torch.float16, torch.bfloat16) or not w.is_contiguous():
        raise ValueError(f"w4a16_mma_dequant: w must be a contiguous fp16/bf16 ({n}, {k}), got {w.dtype} {tuple(w.shape)}")
    err = _error_buffer()
    rc = lib.nq_mma_dequant(qweight.data_ptr(), scales_t.data_ptr(), zeros_t.data_ptr(), w.data_ptr(), n, k, group,
                            0 if w.dtype == torch.float16 else 1, _stream(w), err, len(err))
    if rc != 0:
        raise RuntimeError(f"w4a16_mma_dequant failed: {err.value.decode(errors='replace')}")
    return w


def _aligned(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


@torch.library.custom_op("nvila_quant::w4a16_linear", mutates_args=())
def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None, group: int) -> torch.Tensor:
    """x (M, K) -> (M, N): every element written by the kernel."""
    x = _aligned(x)
    out = torch.empty(x.shape[0], qweight.shape[0], dtype=x.dtype, device=x.device)
    _launch(x, qweight, scales, zeros, bias, group, out)
    return out


@w4a16_linear.register_fake
def _(x, qweight, scales, zeros, bias, group):  # noqa: ANN001, ANN202 (fake impl: shapes only)
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("nvila_quant::w4a16_linear_out", mutates_args=("out",))
def w4a16_linear_out(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     bias: torch.Tensor | None, group: int, out: torch.Tensor) -> None:
    """Writes x @ W^T + b into a caller-provided ``out`` (M, N) (e.g. a NaN-poisoned buffer in tests)."""
    _launch(_aligned(x), qweight, scales, zeros, bias, group, out)


@w4a16_linear_out.register_fake
def _(x, qweight, scales, zeros, bias, group, out):  # noqa: ANN001, ANN202
    return None


@torch.library.custom_op("nvila_quant::w4a16_mma_linear", mutates_args=())
def w4a16_mma_linear(x: torch.Tensor, qweight: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor,
                     bias: torch.Tensor | None, group: int) -> torch.Tensor:
    """x (M, K) -> (M, N) with mma-layout weights: every element written by the kernel."""
    x = _aligned(x)
    out = torch.empty(x.shape[0], qweight.shape[0], dtype=x.dtype, device=x.device)
    mma_launch(_device_library(x), x, qweight, scales_t, zeros_t, bias, group, out)
    return out


@w4a16_mma_linear.register_fake
def _(x, qweight, scales_t, zeros_t, bias, group):  # noqa: ANN001, ANN202 (fake impl: shapes only)
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("nvila_quant::w4a16_mma_gemm", mutates_args=())
def w4a16_mma_gemm(x: torch.Tensor, qweight: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor,
                   bias: torch.Tensor | None, group: int) -> torch.Tensor:
    """x (M, K) -> (M, N) with mma-layout weights, the tiled GEMM (many tokens)."""
    x = _aligned(x)
    out = torch.empty(x.shape[0], qweight.shape[0], dtype=x.dtype, device=x.device)
    mma_launch(_device_library(x), x, qweight, scales_t, zeros_t, bias, group, out, tiled=True)
    return out


@w4a16_mma_gemm.register_fake
def _(x, qweight, scales_t, zeros_t, bias, group):  # noqa: ANN001, ANN202 (fake impl: shapes only)
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("nvila_quant::w4a16_mma_dequant", mutates_args=())
def w4a16_mma_dequant(qweight: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor, group: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """(N, K) fp16/bf16 weight from the mma layout."""
    w = torch.empty(qweight.shape[0], qweight.shape[1] * 8, dtype=dtype, device=qweight.device)
    return mma_dequant_into(_device_library(qweight), qweight, scales_t, zeros_t, group, w)


@w4a16_mma_dequant.register_fake
def _(qweight, scales_t, zeros_t, group, dtype):  # noqa: ANN001, ANN202 (fake impl: shapes only)
    return qweight.new_empty(qweight.shape[0], qweight.shape[1] * 8, dtype=dtype)


# Token counts above this run dequantize (nq_w4a16_dequant, at memory bandwidth) + cuBLAS instead of the fused
# kernels. Measured on H100 (benchmarks/kernels.py, CUDA graphs, cold L2): the GEMV is 1.9-2.1x faster than fp16
# cuBLAS at 1 token but its time grows ~linearly with tokens (8 tokens: 0.40-0.47x cuBLAS), and dequantize +
# cuBLAS is 0.51-0.68x cuBLAS from 8 to 512 tokens, where the fused GEMM kernel is 0.19-0.24x (its 128x128
# tiles leave most SMs idle below a few hundred tokens). NVILA_QUANT_CUDA_GEMM=fused forces the fused kernels.
GEMV_MAX_TOKENS = 4


def _dequantize(weights: CudaWeights, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight in fp16/bf16, exactly the reference's (q - z) * s rounded once (either layout)."""
    q = weights.qweight
    n, k = q.shape[0], q.shape[1] * 8
    w = torch.empty(n, k, dtype=dtype, device=q.device)
    if weights.layout == "mma":
        return mma_dequant_into(_device_library(q), q, weights.scales, weights.zeros, weights.group, w)
    err = _error_buffer()
    rc = _device_library(q).nq_w4a16_dequant(
        q.data_ptr(), weights.scales.data_ptr(), weights.zeros.data_ptr(), w.data_ptr(), n, k, weights.group,
        0 if dtype == torch.float16 else 1, _stream(q), err, len(err))
    if rc != 0:
        raise RuntimeError(f"w4a16_dequant failed: {err.value.decode(errors='replace')}")
    return w


@torch.library.custom_op("nvila_quant::w4a16_dequant", mutates_args=())
def w4a16_dequant(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """(N, K) fp16/bf16 weight from the packed form (the traceable twin of :func:`_dequantize`)."""
    return _dequantize(CudaWeights(qweight, scales, zeros, group), dtype)


@w4a16_dequant.register_fake
def _(qweight, scales, zeros, group, dtype):  # noqa: ANN001, ANN202 (fake impl: shapes only)
    return qweight.new_empty(qweight.shape[0], qweight.shape[1] * 8, dtype=dtype)


def cuda_linear(x: torch.Tensor, weights: CudaWeights, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) fp16/bf16 on CUDA -> (..., N). mma layout: the skinny tensor-core kernel up to MMA_MAX_TOKENS
    tokens; nibble rows: the fused GEMV up to GEMV_MAX_TOKENS; more tokens: dequantize + cuBLAS
    (``NVILA_QUANT_CUDA_GEMM=fused``: the tiled mma GEMM there, or the wmma GEMM for nibble rows). Eager calls launch directly
    (the weights were checked once when prepared; the custom ops' dispatch costs more than the GEMV at one token);
    under ``torch.compile`` they go through the registered ops."""
    shape = x.shape
    b = weights.bias_for(bias, x.dtype)
    x2 = x.reshape(-1, shape[-1])
    m = x2.shape[0]
    compiling = torch.compiler.is_compiling()  # registered ops then, so the call traces
    mma = weights.layout == "mma"
    skinny = m <= (MMA_MAX_TOKENS if mma else GEMV_MAX_TOKENS)
    fused = skinny or os.environ.get("NVILA_QUANT_CUDA_GEMM") == "fused"
    tiled = mma and not skinny
    ops = torch.ops.nvila_quant
    if not fused:
        if compiling:
            dequant = ops.w4a16_mma_dequant if mma else ops.w4a16_dequant
            w = dequant(weights.qweight, weights.scales, weights.zeros, weights.group, x.dtype)
        else:
            w = _dequantize(weights, x.dtype)
        y = torch.nn.functional.linear(x2, w, b)
    elif compiling:
        linear = (ops.w4a16_mma_gemm if tiled else ops.w4a16_mma_linear) if mma else ops.w4a16_linear
        y = linear(x2, weights.qweight, weights.scales, weights.zeros, b, weights.group)
    else:
        x2 = _aligned(x2)
        y = torch.empty(m, weights.qweight.shape[0], dtype=x.dtype, device=x.device)
        if mma:
            mma_launch(_device_library(x2), x2, weights.qweight, weights.scales, weights.zeros, b, weights.group, y,
                       weights_checked=True, tiled=tiled)
        else:
            _launch(x2, weights.qweight, weights.scales, weights.zeros, b, weights.group, y, weights_checked=True)
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
    from nvila_quant.kernels.cpu_native import pack_nibbles
    from nvila_quant.kernels.cuda.layout import mma_pack

    device = torch.device("cuda", device_index)
    gen = torch.Generator().manual_seed(0)
    n, k, group = 96, 512, 64
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    zero = torch.randint(0, 16, (n, k // group), dtype=torch.uint8, generator=gen)
    scale = torch.rand(n, k // group, generator=gen) * 0.02 + 0.001
    w = (q.view(n, k // group, group).float() - zero[..., None].float()) * scale[..., None]
    weights = prepare_cuda(mma_pack(pack_nibbles(q)).to(device), scale.to(device), zero.to(device), group, k, "mma")
    try:
        lib = _library(device_index)
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
