"""CUDA backend: the project's W4A16 GEMM/GEMV (``w4a16.cu``) built with nvcc alone and called as a torch op.

The library is compiled on first use for the GPU present (``-gencode arch=compute_XY,code=sm_XY``) and cached
by source hash and arch (kernels/build.py). It is called through ctypes on the current CUDA stream and wrapped
in ``torch.library.custom_op`` ops, so it works inside ``torch.compile`` (opaque op with a fake impl) and CUDA
graph capture (no allocation, sync or host round trip inside the launch).

    torch.ops.nvila_quant.w4a16_linear(x, qweight, scales, zeros, bias, group) -> out
    torch.ops.nvila_quant.w4a16_linear_out(x, qweight, scales, zeros, bias, group, out) -> None  (writes out)

x (M, K) fp16/bf16; qweight (N, K/8) int32 (nibble rows viewed as int32); scales (N, K/G) fp32;
zeros (N, K/G) uint8; bias (N,) like x or None; out (M, N) like x.
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

from nvila_quant.kernels.build import BuildError, build_shared_library

__all__ = [
    "CUDA_SOURCES",
    "CudaWeights",
    "build_library",
    "cuda_linear",
    "cuda_support",
    "nvcc_flags",
    "prepare_cuda",
]

CUDA_SOURCES = [Path(__file__).parent / "w4a16.cu"]
MIN_CAPABILITY = (8, 0)


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
    """qweight (N, K/8) int32 (a view of the module's nibble rows), scales (N, K/G) fp32, zeros (N, K/G) uint8,
    all contiguous on one device (checked once, in :func:`prepare_cuda`); ``biases`` caches the bias per dtype."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group: int
    biases: dict = field(default_factory=dict)

    def bias_for(self, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        if bias is None:
            return None
        cached = self.biases.get(dtype)
        if cached is None or cached.device != bias.device:
            cached = self.biases[dtype] = bias.to(dtype).contiguous()
        return cached


def prepare_cuda(qnib: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, in_features: int) -> CudaWeights:
    """Repack for the kernels: no copy of the weights (nibble rows are already the kernel's word layout)."""
    if qnib.shape[1] * 2 != in_features or in_features % 32:
        raise ValueError(f"CUDA kernels need 4-bit nibble rows with in_features % 32 == 0, got {tuple(qnib.shape)}")
    weights = CudaWeights(qnib.contiguous().view(torch.int32), scale.float().contiguous(), zero.contiguous(), group)
    _check_weights(weights.qweight, weights.scales, weights.zeros, group, weights.qweight.device)
    return weights


def _check_weights(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                   device: torch.device) -> None:
    n, k = qweight.shape[0], qweight.shape[1] * 8
    expect = {"qweight": ((n, k // 8), torch.int32), "scales": ((n, k // group), torch.float32),
              "zeros": ((n, k // group), torch.uint8)}
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        shape, dtype = expect[name]
        if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous() or t.device != device:
            raise ValueError(f"w4a16_linear: {name} must be a contiguous {dtype} {shape} on {device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")


_ERRORS = threading.local()  # one reusable error-message buffer per thread


def _error_buffer() -> ctypes.Array:
    buf = getattr(_ERRORS, "buf", None)
    if buf is None:
        buf = _ERRORS.buf = ctypes.create_string_buffer(512)
    return buf


def _launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            bias: torch.Tensor | None, group: int, out: torch.Tensor, weights_checked: bool = False) -> None:
    m, k = x.shape
    n = qweight.shape[0]
    if not weights_checked:
        _check_weights(qweight, scales, zeros, group, x.device)
    if qweight.shape[1] * 8 != k:
        raise ValueError(f"w4a16_linear: x has K={k}, the weights K={qweight.shape[1] * 8}")
    if tuple(out.shape) != (m, n) or out.dtype != x.dtype or not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"w4a16_linear: out must be a contiguous {x.dtype} ({m}, {n}) on {x.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"w4a16_linear: x must be fp16 or bf16, got {x.dtype}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != x.dtype or not bias.is_contiguous()):
        raise ValueError(f"w4a16_linear: bias must be a contiguous {x.dtype} ({n},), got {bias.dtype} {tuple(bias.shape)}")
    err = _error_buffer()
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    rc = _library(device).nq_w4a16_linear(
        x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
        None if bias is None else bias.data_ptr(), out.data_ptr(), m, n, k, group,
        0 if x.dtype == torch.float16 else 1, torch.cuda.current_stream(x.device).cuda_stream, err, len(err),
    )
    if rc != 0:
        raise RuntimeError(f"w4a16_linear failed: {err.value.decode(errors='replace')}")


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


# Token counts above this run dequantize (nq_w4a16_dequant, at memory bandwidth) + cuBLAS instead of the fused
# kernels. Measured on H100 (benchmarks/kernels.py, CUDA graphs, cold L2): the GEMV is 1.9-2.1x faster than fp16
# cuBLAS at 1 token but its time grows ~linearly with tokens (8 tokens: 0.40-0.47x cuBLAS), and dequantize +
# cuBLAS is 0.51-0.68x cuBLAS from 8 to 512 tokens, where the fused GEMM kernel is 0.19-0.24x (its 128x128
# tiles leave most SMs idle below a few hundred tokens). NVILA_QUANT_CUDA_GEMM=fused forces the fused kernels.
GEMV_MAX_TOKENS = 4


def _dequantize(weights: CudaWeights, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight in fp16/bf16, exactly the reference's (q - z) * s rounded once."""
    q = weights.qweight
    n, k = q.shape[0], q.shape[1] * 8
    w = torch.empty(n, k, dtype=dtype, device=q.device)
    err = _error_buffer()
    rc = _library(q.device.index if q.device.index is not None else torch.cuda.current_device()).nq_w4a16_dequant(
        q.data_ptr(), weights.scales.data_ptr(), weights.zeros.data_ptr(), w.data_ptr(), n, k, weights.group,
        0 if dtype == torch.float16 else 1, torch.cuda.current_stream(q.device).cuda_stream, err, len(err))
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
    """x (..., K) fp16/bf16 on CUDA -> (..., N). Up to GEMV_MAX_TOKENS tokens: the fused GEMV; more: dequantize
    + cuBLAS. Eager calls launch directly (the weights were checked once when prepared; the custom ops' dispatch
    costs more than the GEMV at one token); under ``torch.compile`` they go through the registered ops."""
    shape = x.shape
    b = weights.bias_for(bias, x.dtype)
    x2 = x.reshape(-1, shape[-1])
    compiling = torch.compiler.is_compiling()  # registered ops then, so the call traces
    if x2.shape[0] > GEMV_MAX_TOKENS and os.environ.get("NVILA_QUANT_CUDA_GEMM") != "fused":
        w = (torch.ops.nvila_quant.w4a16_dequant(weights.qweight, weights.scales, weights.zeros, weights.group, x.dtype)
             if compiling else _dequantize(weights, x.dtype))
        y = torch.nn.functional.linear(x2, w, b)
    elif compiling:
        y = torch.ops.nvila_quant.w4a16_linear(x2, weights.qweight, weights.scales, weights.zeros, b, weights.group)
    else:
        x2 = _aligned(x2)
        y = torch.empty(x2.shape[0], weights.qweight.shape[0], dtype=x.dtype, device=x.device)
        _launch(x2, weights.qweight, weights.scales, weights.zeros, b, weights.group, y, weights_checked=True)
    return y.reshape(*shape[:-1], y.shape[-1])
