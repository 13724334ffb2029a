"""ctypes bindings of the CUDA W4A16 kernels (``csrc/w4a16.cu``, ``csrc/w4a16_mma.cu``), built with nvcc alone.

The library is compiled on first use for the GPU present (``-gencode arch=compute_XY,code=sm_XY``) and cached by
source hash and arch (:mod:`nvila_quant.kernels.build`). Launches go on the current CUDA stream and never allocate,
sync or read back, so they run inside CUDA graph capture; the library writes any refusal into an error buffer,
raised here as a message naming the shape, dtype or launch limit at fault.

Weights: ``qweight`` (N, K/8) int32 (nibble rows, or the mma layout of :mod:`.layout`, viewed as int32), scales
fp32 and zero points uint8, (N, K/G) for nibble rows and (K/G, N) for the mma layout.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from pathlib import Path

import torch

from nvila_quant.kernels.build import build_shared_library
from nvila_quant.kernels.cuda.settings import cuda_settings

__all__ = [
    "CUDA_SOURCES",
    "MIN_CAPABILITY",
    "build_library",
    "check_weights",
    "declare_mma",
    "device_library",
    "library",
    "mma_dequant_into",
    "mma_ksplit",
    "mma_launch",
    "mma_warps",
    "nvcc_flags",
    "rows_dequant_into",
    "rows_launch",
]

CSRC = Path(__file__).parent / "csrc"
CUDA_SOURCES = [CSRC / "w4a16.cu", CSRC / "w4a16_mma.cu"]
MIN_CAPABILITY = (8, 0)

def nvcc_flags(arch: str) -> list[str]:
    """nvcc flags for a shared library targeting ``arch`` (e.g. "80", "90")."""
    return ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-lineinfo",
            f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def build_library(arch: str) -> Path:
    return build_shared_library("nq_w4a16_sm" + arch, CUDA_SOURCES, "nvcc", nvcc_flags(arch), f"sm_{arch}")


@functools.cache
def library(device_index: int) -> ctypes.CDLL:
    """The kernels built for (and loaded on) CUDA device ``device_index``."""
    major, minor = torch.cuda.get_device_capability(device_index)
    lib = ctypes.CDLL(str(build_library(f"{major}{minor}")))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.nq_w4a16_linear.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int, ptr,
                                    ctypes.c_char_p, ctypes.c_int]
    lib.nq_w4a16_linear.restype = ctypes.c_int
    lib.nq_w4a16_dequant.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int, ptr, ctypes.c_char_p,
                                     ctypes.c_int]
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



def check_weights(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
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
        raise ValueError(f"w4a16_linear: bias must be a contiguous {x.dtype} ({n},), "
                         f"got {bias.dtype} {tuple(bias.shape)}")


def _stream(t: torch.Tensor) -> int | None:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else None


def device_library(t: torch.Tensor) -> ctypes.CDLL:
    return library(t.device.index if t.device.index is not None else torch.cuda.current_device())


def rows_launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            bias: torch.Tensor | None, group: int, out: torch.Tensor, weights_checked: bool = False) -> None:
    """Nibble-row kernels (w4a16.cu) into ``out``."""
    m, k = x.shape
    if not weights_checked:
        check_weights(qweight, scales, zeros, group, x.device)
    _check_call(x, qweight, bias, out)
    err = _error_buffer()
    rc = device_library(x).nq_w4a16_linear(
        x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
        None if bias is None else bias.data_ptr(), out.data_ptr(), m, qweight.shape[0], k, group,
        0 if x.dtype == torch.float16 else 1, _stream(x), err, len(err),
    )
    if rc != 0:
        raise RuntimeError(f"w4a16_linear failed: {err.value.decode(errors='replace')}")



def mma_warps(m: int) -> int:
    """Warps per CTA of the mma kernel: 16 up to 16 tokens (more loads in flight per 32-row tile), else 8."""
    return (warps if (warps := cuda_settings().mma_warps) in (8, 16) and (warps == 8 or m <= 16)
            else (16 if m <= 16 else 8))


def mma_ksplit(m: int, n: int, k: int, device: torch.device, warps: int = 8, tiled: bool = False) -> int:
    """K slices for the skinny kernel (32-row CTAs of ``warps`` warps) or the tiled GEMM (128 x 128 tiles)
    (``NVILA_QUANT_CUDA_KSPLIT`` fixes it): 1 when the CTAs already give three quarters of one per SM (a split costs
    a second kernel), else enough slices for about one per SM; at most 16 slices, and at least one 32-wide chunk per
    warp (skinny) or 8 chunks per slice (tiled)."""
    chunks = k // 32
    if (fixed := cuda_settings().ksplit) > 0:
        return max(1, min(fixed, chunks))
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
        check_weights(qweight, scales_t, zeros_t, group, x.device, "mma")
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
        raise ValueError(f"w4a16_mma_dequant: w must be a contiguous fp16/bf16 ({n}, {k}), "
                         f"got {w.dtype} {tuple(w.shape)}")
    err = _error_buffer()
    rc = lib.nq_mma_dequant(qweight.data_ptr(), scales_t.data_ptr(), zeros_t.data_ptr(), w.data_ptr(), n, k, group,
                            0 if w.dtype == torch.float16 else 1, _stream(w), err, len(err))
    if rc != 0:
        raise RuntimeError(f"w4a16_mma_dequant failed: {err.value.decode(errors='replace')}")
    return w




def rows_dequant_into(lib: ctypes.CDLL, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                      w: torch.Tensor) -> torch.Tensor:
    """The (N, K) fp16/bf16 weight, exactly the reference's (q - z) * s rounded once, from nibble rows (into ``w``)."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    if tuple(w.shape) != (n, k) or w.dtype not in (torch.float16, torch.bfloat16) or not w.is_contiguous():
        raise ValueError(f"w4a16_dequant: w must be a contiguous fp16/bf16 ({n}, {k}), got {w.dtype} {tuple(w.shape)}")
    err = _error_buffer()
    rc = lib.nq_w4a16_dequant(qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), w.data_ptr(), n, k, group,
                              0 if w.dtype == torch.float16 else 1, _stream(w), err, len(err))
    if rc != 0:
        raise RuntimeError(f"w4a16_dequant failed: {err.value.decode(errors='replace')}")
    return w
