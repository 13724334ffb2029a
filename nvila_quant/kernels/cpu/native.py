"""ctypes bindings of the native CPU int4 kernels (``csrc/``: AVX-512 / AVX2 + OpenMP, one library).

The library is compiled on first use with the system C compiler (``-march=native``) and cached per CPU
(:mod:`nvila_quant.kernels.build`); without a compiler or AVX the torch paths run instead
(``NVILA_QUANT_NO_NATIVE=1`` turns it off). Every call's return code becomes an error that names the shape or the
CPU feature at fault (:func:`check_rc`).

Weight layouts: nibble rows (``nvila_quant.numerics.nibbles``) for the ``rows.c`` kernels, T16
(:mod:`nvila_quant.kernels.cpu.layout`) for the ``t16*.c`` kernels. Scales are read in the checkpoint's dtype
(:data:`SCALE_KINDS`), zero points as uint8.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from nvila_quant.kernels.build import BuildError, build_shared_library, cpu_fingerprint
from nvila_quant.kernels.cpu.settings import CpuSettings, cpu_settings, on_cpu_settings_change
from nvila_quant.numerics.nibbles import unpack_nibbles
from nvila_quant.numerics.quantizer import dequantize
from nvila_quant.settings import overrides

__all__ = [
    "AMX_CPU",
    "CAP_AMX",
    "CAP_BF16",
    "CAP_F32",
    "CAP_T16_F32",
    "CAP_VNNI",
    "INT8_MAX_TOKENS",
    "SCALE_KINDS",
    "NativeKernelError",
    "NativeLayer",
    "amx_active",
    "avx512_bf16_only",
    "check_rc",
    "default_vnni_max_tokens",
    "dequantize_nibbles",
    "int8_max_tokens",
    "library",
    "load_library",
    "native_available",
    "native_caps",
    "native_linear",
    "native_linear_support",
    "t16_convert",
    "t16_dequantize_t",
    "t16_kernel",
    "t16_linear",
    "t16_route",
    "t16_shape_ok",
    "unavailable_reason",
    "vnni_thresholds",
]

logger = logging.getLogger(__name__)
CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "rows.c", CSRC / "t16.c", CSRC / "t16_vnni.c", CSRC / "t16_amx.c", CSRC / "step.c",
           CSRC / "int8.c"]  # one library
HEADERS = [CSRC / "nq_shared.h"]
CAP_F32, CAP_BF16, CAP_T16_F32, CAP_AMX, CAP_VNNI = 1, 2, 4, 8, 16  # nq_caps() bits
# Intel CPUs with AMX (Sapphire Rapids and later): where the default thresholds were measured and vdpbf16ps is slow
AMX_CPU = "amx_bf16" in cpu_fingerprint().split()
# how the kernels read scales: as QuantLinear stores them (the checkpoint's dtype); zero points are uint8
SCALE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# NVILA_QUANT_CPU_ACTIVATIONS=int8: calls of up to this many tokens take one int8 per element (bf16 / fp16, fp32
# activations): where it was not slower than the exact kernels on Zen 4 (benchmarks/README.md, "Activations")
INT8_MAX_TOKENS = (2, 64)


class NativeKernelError(RuntimeError):
    """A native CPU kernel refused a call (its return code, as a message naming the shape or feature)."""


_RC_REASONS = {
    -1: "the kernel does not take these sizes (N % 16 and K, group % 64 for T16; K, group % 32 for nibble rows)",
    -2: "the kernel is not compiled in for this CPU, or the OS refused AMX tile state",
    -3: "out of memory for the kernel's scratch buffers",
}


def check_rc(rc: int, fn: str, **shape: object) -> None:
    """Raise :class:`NativeKernelError` for a non-zero return code of ``fn``, naming the call's sizes."""
    if rc != 0:
        sizes = ", ".join(f"{k}={tuple(v) if isinstance(v, torch.Size) else v}" for k, v in shape.items())
        raise NativeKernelError(f"{fn} failed with code {rc} ({_RC_REASONS.get(rc, 'unknown code')}) for {sizes}")


def load_library(march: str = "native") -> ctypes.CDLL:
    """Build (cached) and load the kernels for ``-march=<march>`` (tests load an AVX2-only build this way)."""
    name = "nq_int4_cpu" if march == "native" else f"nq_int4_cpu_{march.replace('-', '_')}"
    path = build_shared_library(name, SOURCES, "cc", [
        "-O3", f"-march={march}", "-fopenmp", "-fPIC", "-shared", "-std=c11"], cpu_fingerprint(), depends=HEADERS)
    lib = ctypes.CDLL(str(path))
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.nq_caps.restype = cint
    lib.nq_dequant.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, cint, cint, cint]
    lib.nq_linear.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, cint, cint, cint]
    lib.nq_linear_bf16_64.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, cint, cint]
    t16_kernels = ("nq_t16_bf16", "nq_t16_f32", "nq_t16_bf16_amx", "nq_t16_bf16_amx_gemm", "nq_t16_bf16_vnni",
                   "nq_t16_f32_vnni", "nq_t16_bf16_vnni8", "nq_t16_f32_vnni8")
    for fn in t16_kernels:
        getattr(lib, fn).argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, cint, cint]
    lib.nq_amx_init.restype = cint
    for fn in ("nq_set_amx_min_tokens", "nq_set_amx_gemm_min_tokens"):
        getattr(lib, fn).argtypes, getattr(lib, fn).restype = [i64], i64
    for fn in ("nq_set_vnni_max_tokens", "nq_set_vnni_int8_max_tokens"):
        getattr(lib, fn).argtypes, getattr(lib, fn).restype = [i64, cint], i64
    lib.nq_vnni_int8.argtypes, lib.nq_vnni_int8.restype = [i64, cint], cint
    layer_argtypes = [ptr, ptr, ptr, i64, cint]
    lib.nq_layer_bf16.argtypes = lib.nq_layer_t16_bf16.argtypes = lib.nq_layer_t16_f32.argtypes = layer_argtypes
    lib.nq_t16_pack.argtypes = lib.nq_t16_unpack.argtypes = [ptr, ptr, i64, i64]
    lib.nq_t16_dequant_t.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, cint, cint, cint]
    lib.nq_t16_route.argtypes, lib.nq_t16_route.restype = [i64, cint], cint
    for fn in ("nq_dequant", "nq_linear", "nq_linear_bf16_64", *t16_kernels, "nq_layer_bf16", "nq_layer_t16_bf16",
               "nq_layer_t16_f32", "nq_t16_pack", "nq_t16_unpack", "nq_t16_dequant_t"):
        getattr(lib, fn).restype = cint
    return lib


def default_vnni_max_tokens(amx_cpu: bool, amx_granted: bool) -> int:
    """The bf16 VNNI kernel's token limit when ``NVILA_QUANT_CPU_VNNI_MAX_TOKENS`` is unset: 4 on AMX CPUs (AMX tiles
    win from 6 tokens); 64 on an AMX-class CPU whose OS refuses AMX (Linux before 5.16, some hypervisors), where the
    tokens AMX would take otherwise fall to the slower vdpbf16ps kernel; 0 elsewhere."""
    if not amx_cpu:
        return 0
    return 4 if amx_granted else 64


def vnni_thresholds(settings: CpuSettings, amx_granted: bool) -> tuple[int, int]:
    """(bf16, fp32) token limits of the VNNI kernels with exact activations: the settings', or the measured defaults
    for this CPU (fp32: 64 - every count below the dense path's 48 on AMX-class CPUs; on Zen 4 the two 15-bit parts
    beat the FMA kernel at every count measured, 1 to 64)."""
    bf16 = settings.vnni_max_tokens
    f32 = settings.vnni_f32_max_tokens
    return (default_vnni_max_tokens(AMX_CPU, amx_granted) if bf16 is None else bf16, 64 if f32 is None else f32)


def int8_max_tokens(settings: CpuSettings) -> tuple[int, int]:
    """Up to how many tokens (bf16 / fp16, fp32) activations go to the VNNI kernel as one int8 per element: none
    unless ``NVILA_QUANT_CPU_ACTIVATIONS=int8``, then ``NVILA_QUANT_CPU_INT8_MAX_TOKENS`` (both) or
    :data:`INT8_MAX_TOKENS`."""
    if settings.activations != "int8":
        return 0, 0
    if settings.int8_max_tokens is not None:
        return settings.int8_max_tokens, settings.int8_max_tokens
    return INT8_MAX_TOKENS


def _apply_thresholds(lib: ctypes.CDLL, settings: CpuSettings) -> None:
    """Hand the dispatch thresholds to the library (its dispatchers read them on every call)."""
    amx = bool(lib.nq_caps() & CAP_AMX) and lib.nq_amx_init() == 0  # the OS grants AMX tile state to this process
    if lib.nq_caps() & CAP_AMX:
        lib.nq_set_amx_min_tokens(settings.amx_min_tokens)
        lib.nq_set_amx_gemm_min_tokens(settings.amx_gemm_min_tokens)
    bf16, f32 = vnni_thresholds(settings, amx)
    lib.nq_set_vnni_max_tokens(bf16, 0)
    lib.nq_set_vnni_max_tokens(f32, 1)
    int8_bf16, int8_f32 = int8_max_tokens(settings)
    lib.nq_set_vnni_int8_max_tokens(int8_bf16, 0)
    lib.nq_set_vnni_int8_max_tokens(int8_f32, 1)


SLOW_PATH = ("int4 matmuls run on torch's int4 op (few tokens) or dequantize + matmul instead: several times "
             "slower; `nvila-quant info --kernels` shows what runs where")


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if cpu_settings().no_native:
        return None, "turned off by NVILA_QUANT_NO_NATIVE=1"
    try:
        lib = load_library()
    except BuildError as e:
        return None, str(e)
    except OSError as e:
        return None, f"the built library does not load: {e}"
    if lib.nq_caps() == 0:
        return None, "this CPU has neither AVX-512 nor AVX2 with FMA and F16C, which the kernels need"
    return lib, None


@functools.lru_cache(maxsize=1)
def _state() -> tuple[ctypes.CDLL | None, str | None]:
    """(the library, None) or (None, why not): built and loaded once per process."""
    lib, reason = _load()
    if lib is None:
        # a warning (once per process) unless the user turned them off: the CPU speeds depend on these kernels
        level = logging.INFO if cpu_settings().no_native else logging.WARNING
        logger.log(level, "native CPU int4 kernels unavailable: %s; %s", reason, SLOW_PATH)
    else:
        _apply_thresholds(lib, cpu_settings())
    return lib, reason


def _library() -> ctypes.CDLL | None:
    return _state()[0]


def unavailable_reason() -> str | None:
    """Why the native CPU kernels cannot run here (None when they can); builds the library on first use."""
    return _state()[1]


def library() -> ctypes.CDLL | None:
    """The native library for this CPU (built on first use), or None where it cannot build or is turned off."""
    return _library()


def _settings_changed(name: str) -> None:
    if name == "no_native":
        _state.cache_clear()
        native_caps.cache_clear()
    elif _state.cache_info().currsize and (lib := _library()) is not None:
        _apply_thresholds(lib, cpu_settings())


on_cpu_settings_change(_settings_changed)


def amx_active() -> bool:
    """Whether the bf16 T16 kernel runs on AMX tiles here (from ``amx_min_tokens`` tokens)."""
    lib = library()
    return (lib is not None and bool(lib.nq_caps() & CAP_AMX) and lib.nq_amx_init() == 0
            and cpu_settings().amx_min_tokens > 0)


@contextmanager
def avx512_bf16_only() -> Iterator[None]:
    """Within the block the T16 kernels run on AVX-512 at every token count (bf16: vdpbf16ps, fp32: FMA): no AMX, no
    VNNI (benchmarks and tests compare)."""
    with overrides(cpu_settings(), amx_min_tokens=0, amx_gemm_min_tokens=0, vnni_max_tokens=0, vnni_f32_max_tokens=0,
                   activations="exact"):
        yield


@functools.lru_cache(maxsize=1)
def native_caps() -> int:
    """Bit 1: fp32 kernels (AVX-512F); bit 2: bf16 kernels (AVX-512 BW + BF16); bit 4: the fp32 T16 kernel
    (AVX-512 BW, or AVX2 + FMA + F16C); bit 8: the AMX T16 kernels are compiled in; bit 16: the VNNI T16
    kernels (bf16 ones + AVX-512 VNNI); 0 without the library."""
    lib = library()
    return 0 if lib is None else int(lib.nq_caps())


def native_available() -> bool:
    return native_caps() != 0


_ROUTES = {0: None, 1: "vnni", 2: "amx-tiles", 3: "amx-gemm"}  # nq_t16_route's codes (nq_shared.h)


def t16_route(x_dtype: torch.dtype, tokens: int) -> str | None:
    """Which native T16 kernel a call of ``tokens`` rows takes here, as the C dispatcher decides: "vnni-int8x2" (bf16
    x as two int8 parts), "vnni-int8x4" (fp32 x: two 15-bit parts as int8 pairs), "vnni-int8x1" (x as one int8 per
    element: ``NVILA_QUANT_CPU_ACTIVATIONS=int8``), "amx-tiles", "amx-gemm", "avx512-bf16", "avx512-fma" /
    "avx2-fma" (fp32 weights), or None (no T16 kernel)."""
    kernel = t16_kernel(x_dtype)
    lib = library()
    if kernel is None or lib is None:
        return None
    f32 = kernel == "f32"
    route = _ROUTES[lib.nq_t16_route(tokens, int(f32))]
    if route == "vnni":
        if lib.nq_vnni_int8(tokens, int(f32)):
            return "vnni-int8x1"
        return "vnni-int8x4" if f32 else "vnni-int8x2"
    if route is not None:
        return route
    if not f32:
        return "avx512-bf16"
    return "avx512-fma" if native_caps() & CAP_F32 else "avx2-fma"


def meta_ok(scale: torch.Tensor, zero: torch.Tensor) -> bool:
    """Whether the kernels read these scales and zero points as they are (fp32/bf16/fp16 and uint8)."""
    return scale.dtype in SCALE_KINDS and zero.dtype == torch.uint8


def _dtype_cap(dtype: torch.dtype) -> int:
    return {torch.float32: CAP_F32, torch.bfloat16: CAP_BF16}.get(dtype, 0)


def native_linear_support(dtype: torch.dtype, in_features: int, group: int) -> bool:
    """Whether the nibble-row kernels take activations/weights of ``dtype`` for this K and group size."""
    cap = _dtype_cap(dtype)
    return bool(cap and native_caps() & cap and in_features % 32 == 0 and group % 32 == 0 and in_features % group == 0)


def t16_shape_ok(out_features: int, in_features: int, group: int) -> bool:
    """Whether a layer's shape fits the T16 kernels (N % 16, K and group % 64)."""
    return out_features % 16 == 0 and in_features % 64 == 0 and group % 64 == 0 and in_features % group == 0


def t16_kernel(x_dtype: torch.dtype) -> str | None:
    """The T16 kernel for ``x_dtype`` activations on this CPU: "bf16" (vdpbf16ps; bf16 and fp16 activations),
    "f32" (exact fp32 weights, FMA; fp32 activations, and bf16 / fp16 ones on AVX-512 CPUs without BF16; AVX2 CPUs
    run it for fp32 activations) or None."""
    caps = native_caps()
    if x_dtype != torch.float32 and caps & CAP_BF16:
        return "bf16"
    if x_dtype != torch.float32 and not caps & CAP_F32:  # AVX2 only: bf16 activations stay on torch's int4 op
        return None
    return "f32" if caps & CAP_T16_F32 else None


def t16_convert(name: str, src: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``nq_t16_pack`` / ``nq_t16_unpack``: src (N, K/2) uint8 CPU -> ``out`` (same shape)."""
    n, k = src.shape[0], src.shape[1] * 2
    if src.device.type != "cpu" or src.dtype != torch.uint8 or n % 16 or k % 64:
        raise ValueError(f"T16 layout needs a CPU uint8 (N, K/2) tensor with N % 16 == 0 and K % 64 == 0, got "
                         f"{src.dtype} {tuple(src.shape)} on {src.device}")
    lib = library()
    if lib is None:
        raise NativeKernelError(f"{name}: the native CPU kernels are not available here")
    src = src.contiguous()
    check_rc(getattr(lib, name)(src.data_ptr(), out.data_ptr(), n, k), name, N=n, K=k)
    return out


def t16_linear(x: torch.Tensor, t16: torch.Tensor, scale_t: torch.Tensor, zero_t: torch.Tensor,
               bias: torch.Tensor | None, group: int) -> torch.Tensor:
    """x (M, K) bf16 / fp16 / fp32 -> (M, N) in x's dtype with T16 weights (N, K/2), scale_t (K/G, N) fp32/bf16/fp16,
    zero_t (K/G, N) uint8, bias (N,) fp32 (all contiguous), on the :func:`t16_kernel` for x's dtype."""
    m, k = x.shape
    n = t16.shape[0]
    kernel = t16_kernel(x.dtype)
    lib = library()
    if kernel is None or lib is None or not meta_ok(scale_t, zero_t) or scale_t.shape != (k // group, n):
        raise ValueError(f"t16_linear: no T16 kernel for {x.dtype} here, or scales not (K/G, N): "
                         f"{tuple(scale_t.shape)}")
    compute = torch.bfloat16 if kernel == "bf16" else torch.float32
    xc = x.to(compute).contiguous()
    out = torch.empty(m, n, dtype=compute)
    fn = "nq_t16_bf16" if kernel == "bf16" else "nq_t16_f32"
    rc = getattr(lib, fn)(xc.data_ptr(), t16.data_ptr(), scale_t.data_ptr(), zero_t.data_ptr(),
                          None if bias is None else bias.data_ptr(), out.data_ptr(), m, n, k, group,
                          torch.get_num_threads(), SCALE_KINDS[scale_t.dtype])
    check_rc(rc, fn, x=x.shape, N=n, group=group)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def t16_dequantize_t(t16: torch.Tensor, scale_t: torch.Tensor, zero_t: torch.Tensor, group: int, dtype: torch.dtype,
                     r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """W^T (K, r1 - r0) in ``dtype`` (fp32 or bf16) for output rows r0:r1 (multiples of 16) of T16 weights (N, K/2)
    with scale_t / zero_t (K/G, N): (q - z) * s rounded once, bit-identical to :func:`dequantize_nibbles`, read from
    the T16 layout directly. Written into ``out`` when given; None where the native kernel cannot (the caller unpacks
    to rows instead)."""
    n, k = t16.shape[0], t16.shape[1] * 2
    lib = library()
    if (lib is None or not native_caps() & CAP_T16_F32 or dtype not in (torch.float32, torch.bfloat16)
            or (dtype == torch.bfloat16 and not native_caps() & CAP_BF16) or not meta_ok(scale_t, zero_t)
            or r0 % 16 or r1 % 16 or not 0 <= r0 <= r1 <= n):
        return None
    if out is None:
        out = torch.empty(k, r1 - r0, dtype=dtype)
    rc = lib.nq_t16_dequant_t(t16.data_ptr(), scale_t.data_ptr(), zero_t.data_ptr(), out.data_ptr(), n, k, group,
                              r0 // 16, (r1 - r0) // 16, int(dtype == torch.bfloat16), torch.get_num_threads(),
                              SCALE_KINDS[scale_t.dtype])
    return out if rc == 0 else None


def dequantize_nibbles(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(q - z) * s in fp32, rounded once to ``dtype``. packed (N, K/2) uint8, scale (N, K/group) fp32/bf16/fp16,
    zero (N, K/group) uint8 (other dtypes: the torch path) -> (N, K) ``dtype``; written into ``out`` when given
    (a reusable scratch buffer)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    if out is None:
        out = torch.empty(n, k, dtype=dtype, device=packed.device)
    lib = library()
    if (lib is None or packed.device.type != "cpu" or not native_linear_support(dtype, k, group)
            or not meta_ok(scale, zero)):
        return out.copy_(dequantize(unpack_nibbles(packed), scale.float(), zero, group))  # fp32, then out's dtype
    packed, scale, zero = packed.contiguous(), scale.contiguous(), zero.contiguous()
    rc = lib.nq_dequant(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), out.data_ptr(), n, k, group,
                        int(dtype == torch.bfloat16), torch.get_num_threads(), SCALE_KINDS[scale.dtype])
    check_rc(rc, "nq_dequant", N=n, K=k, group=group, dtype=dtype)
    return out


def native_linear(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
    group: int,
) -> torch.Tensor:
    """Fused dequantize-GEMM on nibble rows: x (M, K) bf16 or fp32 -> (M, N) in x's dtype. scale (N, K/G)
    fp32/bf16/fp16 and zero (N, K/G) uint8, contiguous; bias (N,) fp32.

    Callers check :func:`native_linear_support` first."""
    m, k = x.shape
    n = packed.shape[0]
    if not meta_ok(scale, zero):
        raise ValueError(f"native kernels read fp32/bf16/fp16 scales and uint8 zeros, got {scale.dtype}, {zero.dtype}")
    lib = library()
    if lib is None:
        raise NativeKernelError("native_linear: the native CPU kernels are not available here")
    kind = SCALE_KINDS[scale.dtype]
    out = torch.empty(m, n, dtype=x.dtype)
    bias_ptr = None if bias is None else bias.data_ptr()
    x = x.contiguous()
    if x.dtype == torch.bfloat16 and k % 64 == 0 and group % 64 == 0:
        fn = "nq_linear_bf16_64"
        rc = lib.nq_linear_bf16_64(x.data_ptr(), packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), bias_ptr,
                                   out.data_ptr(), m, n, k, group, torch.get_num_threads(), kind)
    else:
        fn = "nq_linear"
        rc = lib.nq_linear(x.data_ptr(), packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), bias_ptr,
                           out.data_ptr(), m, n, k, group, int(x.dtype == torch.bfloat16), torch.get_num_threads(),
                           kind)
    check_rc(rc, fn, x=x.shape, N=n, group=group)
    return out


class _LayerStruct(ctypes.Structure):  # nq_layer in csrc/nq_shared.h
    _fields_ = [("q", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("group", ctypes.c_int64),
                ("scale_kind", ctypes.c_int64)]


class NativeLayer:
    """A fused kernel bound once to one layer's tensors, so a call passes only x, the output and the token count (a
    per-call cost that shows when caches are cold: every layer of a decode step). ``dtype`` is the activations'
    (and output's) dtype. Nibble rows: the bf16 kernel; requires bf16 support, K and group multiples of 64
    (:meth:`supports`). ``t16=True``: packed is the T16 layout, scale / zero are transposed (K/G, N), and the kernel
    is :func:`t16_kernel`'s for ``dtype`` ("bf16" needs bf16 activations, "f32" fp32 ones)."""

    __slots__ = ("call", "dtype", "k", "keep", "max_numel", "n", "name", "outs", "ptr", "struct")

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
                 group: int, t16: bool = False, dtype: torch.dtype = torch.bfloat16) -> None:
        n, k = packed.shape[0], packed.shape[1] * 2
        kernel = t16_kernel(dtype) if t16 and t16_shape_ok(n, k, group) else None
        ok = ((kernel == "bf16" and dtype == torch.bfloat16) or (kernel == "f32" and dtype == torch.float32)
              if t16 else (dtype == torch.bfloat16 and self.supports(k, group)))
        lib = library()
        if not ok or not meta_ok(scale, zero) or lib is None:
            raise ValueError(f"NativeLayer: no native kernel for {dtype} activations with N={n}, K={k}, group={group}")
        self.keep = tuple(t.contiguous() for t in (packed, scale, zero) + (() if bias is None else (bias,)))
        self.struct = _LayerStruct(*(t.data_ptr() for t in self.keep[:3]),
                                   None if bias is None else self.keep[3].data_ptr(),
                                   n, k, group, SCALE_KINDS[scale.dtype])
        self.ptr, self.n, self.k, self.dtype = ctypes.addressof(self.struct), n, k, dtype
        self.name = ("nq_layer_t16_f32" if kernel == "f32" else "nq_layer_t16_bf16") if t16 else "nq_layer_bf16"
        self.call = getattr(lib, self.name)
        self.max_numel = 0  # inputs with fewer elements take this kernel (set by the CPU backend's plan)
        self.outs: dict[torch.Size, tuple[torch.Tensor, int]] = {}  # input shape -> (output template, tokens)

    def entry(self, shape: torch.Size) -> tuple[torch.Tensor, int]:
        """(an output-shaped template: one element, expanded; token count) for inputs of ``shape``, kept per shape."""
        if len(self.outs) >= 16:  # a few shapes in practice (decode, prefill lengths); bounded anyway
            self.outs.clear()
        tokens = shape.numel() // self.k
        entry = self.outs[shape] = (torch.empty(1, dtype=self.dtype).expand(*shape[:-1], self.n), tokens)
        return entry

    @staticmethod
    def supports(in_features: int, group: int) -> bool:
        return native_linear_support(torch.bfloat16, in_features, group) and in_features % 64 == 0 and group % 64 == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) in ``self.dtype``, contiguous (the caller checks K and dtype) -> (..., N) in ``self.dtype``."""
        return self.run(x, self.outs.get(x.shape) or self.entry(x.shape))

    def run(self, x: torch.Tensor, entry: tuple[torch.Tensor, int]) -> torch.Tensor:
        """:meth:`__call__` with x's :meth:`entry` at hand (QuantLinear's shortcut looks it up once)."""
        out = torch.empty_like(entry[0])  # (cold caches: cheaper than new_empty / torch.empty with a size)
        rc = self.call(self.ptr, x.data_ptr(), out.data_ptr(), entry[1], torch.get_num_threads())
        if rc != 0:
            check_rc(rc, self.name, x=x.shape, N=self.n, K=self.k)
        return out
