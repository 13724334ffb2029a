"""Native CPU int4 kernels (``csrc/int4_cpu.c``, ``t16_vnni.c``, ``t16_amx.c``; AVX-512 + OpenMP) with torch fallbacks.

Layout ("nibble rows"): q (N, K/2) uint8, byte j of row n = k 2j (low nibble) | k 2j+1 (high nibble).
The library is compiled on first use with the system C compiler (``-march=native``) and cached per CPU
(kernels/build.py); without a compiler or AVX-512 the torch paths run instead. ``NVILA_QUANT_NO_NATIVE=1``
disables it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from nvila_quant.kernels.build import BuildError, build_shared_library, cpu_fingerprint, env_number
from nvila_quant.quant.primitives import dequantize

__all__ = [
    "dequantize_nibbles",
    "empty_huge_pages",
    "load_library",
    "native_available",
    "native_caps",
    "native_linear",
    "native_linear_support",
    "NativeLayer",
    "pack_nibbles",
    "t16_pack",
    "t16_kernel",
    "t16_dequantize_t",
    "t16_linear",
    "t16_route",
    "t16_shape_ok",
    "t16_unpack",
    "unpack_nibbles",
]

logger = logging.getLogger(__name__)
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / "int4_cpu.c", _CSRC / "t16_vnni.c", _CSRC / "t16_amx.c"]  # one library; shared int4_cpu.h
CAP_F32, CAP_BF16, CAP_T16_F32, CAP_AMX, CAP_VNNI = 1, 2, 4, 8, 16
# Intel CPUs with AMX (Sapphire Rapids and later): where the thresholds below were measured, and where vdpbf16ps is slow
AMX_CPU = "amx_bf16" in cpu_fingerprint().split()
# From this many tokens the bf16 T16 kernel runs on AMX tiles where the CPU has them (Sapphire Rapids and later).
# Measured with 4096x4096 g128 on a 2-core Xeon (Emerald Rapids) VM: 1 token 0.38 ms AVX-512 vs 0.46 ms AMX; 2 tokens
# 0.56 vs 0.44; 8 tokens 1.92 vs 0.48 (dense bf16 1.93). NVILA_QUANT_CPU_AMX_MIN_TOKENS overrides (0: never).
AMX_MIN_TOKENS = int(env_number("NVILA_QUANT_CPU_AMX_MIN_TOKENS", 2))
# From this many tokens it runs as a tiled GEMM on weights dequantized once per call to bf16 (the dense path's
# numerics; no per-group step). Same VM, 4096x4096: 64 tokens 2.8 ms vs 3.5 ms GEMM, 96 tokens 3.75 vs 3.23, 128 tokens 3.96 vs 2.84 (dense
# bf16 3.98), 512 tokens 16.4 vs 9.1 (dense 11.95). NVILA_QUANT_CPU_AMX_GEMM_MIN_TOKENS overrides (0: never).
AMX_GEMM_MIN_TOKENS = int(env_number("NVILA_QUANT_CPU_AMX_GEMM_MIN_TOKENS", 80))
# Up to this many tokens the bf16 T16 kernel multiplies integer activations (one scale per 64 k, 15-bit mantissa, as
# two int8 parts) with vpdpbusd instead of bf16 with vdpbf16ps, which costs ~1.7 cycles per instruction on Sapphire /
# Emerald Rapids (vs ~0.5 for the VNNI ones): same VM, 4096x4096, 1 token 0.38 ms vs 0.53 (int16 parts with
# vpdpwssd, the first version: 0.38), 2 tokens 0.35 vs 0.57 (AMX); errors equal to the bf16 output's rounding. The
# int8 parts take ~30% fewer instructions per weight than int16 ones (no widening to words): 7-17% faster at 1 token
# on cold caches, the same at 2-8. Against the AMX tile kernel (same VM, cold caches, 4096x4096 / 11008x4096 /
# 4096x11008): 3 tokens 0.57-0.75 vs 0.71-0.89 ms / 1.94 vs 2.46 / 1.69 vs 2.24, 4 tokens 0.77-0.97 vs 0.82-1.13 /
# 2.22 vs 2.55 / 1.80 vs 2.24, 6 tokens 0.86-1.23 vs 0.69-1.00 (AMX ahead from there). On by default up to 4 tokens
# where AMX marks such a CPU (64 where the OS refuses AMX: vnni_max_tokens_default); NVILA_QUANT_CPU_VNNI_MAX_TOKENS
# overrides (0: never).
VNNI_MAX_TOKENS = int(env_number("NVILA_QUANT_CPU_VNNI_MAX_TOKENS", 4 if AMX_CPU else 0))
# fp32 activations: two 15-bit integer parts, each as int8 pairs (x to within 2^-31 of each 64-k chunk's largest;
# outputs ~2e-7 from an fp64 product, the exact-weight FMA kernel's ~1e-6) instead of that FMA kernel, on every CPU
# with AVX-512 VNNI, BF16 or not (CPUs without BF16 - Ice Lake, Cascade Lake - run bf16 activations on it too): same
# VM, 1 / 2 tokens 1.8-2.0x / 1.5-1.8x faster than it (measured with the parts as int16 and vpdpwssd; as int8 pairs
# the outputs are bit-identical and the time the same), and still ahead at every count up to the dense path's 48:
# 4096x4096, 4 / 16 / 32 / 48 tokens 0.99 vs 1.14 ms / 3.2 vs 4.0 / 7.5 vs 8.6 / 11.3 vs 14.1. Up to 64 tokens where
# AMX marks such a CPU (i.e. every call below the dense path), 2 elsewhere (unmeasured beyond);
# NVILA_QUANT_CPU_VNNI_F32_MAX_TOKENS overrides (0: never).
VNNI_F32_MAX_TOKENS = int(env_number("NVILA_QUANT_CPU_VNNI_F32_MAX_TOKENS", 64 if AMX_CPU else 2))


def load_library(march: str = "native") -> ctypes.CDLL:
    """Build (cached) and load the kernels for ``-march=<march>`` (tests load an AVX2-only build this way)."""
    name = "nq_int4_cpu" if march == "native" else f"nq_int4_cpu_{march.replace('-', '_')}"
    path = build_shared_library(name, _SOURCES, "cc", [
        "-O3", f"-march={march}", "-fopenmp", "-fPIC", "-shared", "-std=c11"], cpu_fingerprint(),
        depends=[_CSRC / "int4_cpu.h"])
    lib = ctypes.CDLL(str(path))
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.nq_caps.restype = cint
    lib.nq_dequant.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, cint, cint, cint]
    lib.nq_linear.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, cint, cint, cint]
    lib.nq_linear_bf16_64.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, cint, cint]
    t16_kernels = ("nq_t16_bf16", "nq_t16_f32", "nq_t16_bf16_amx", "nq_t16_bf16_amx_gemm", "nq_t16_bf16_vnni",
                   "nq_t16_f32_vnni")
    for fn in t16_kernels:
        getattr(lib, fn).argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, cint, cint]
    lib.nq_amx_init.restype = cint
    for fn in ("nq_set_amx_min_tokens", "nq_set_amx_gemm_min_tokens"):
        getattr(lib, fn).argtypes, getattr(lib, fn).restype = [i64], i64
    lib.nq_set_vnni_max_tokens.argtypes, lib.nq_set_vnni_max_tokens.restype = [i64, cint], i64
    lib.nq_layer_bf16.argtypes = lib.nq_layer_t16_bf16.argtypes = lib.nq_layer_t16_f32.argtypes = [ptr, ptr, ptr, i64, cint]
    lib.nq_t16_pack.argtypes = lib.nq_t16_unpack.argtypes = [ptr, ptr, i64, i64]
    lib.nq_t16_dequant_t.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, cint, cint, cint]
    lib.nq_t16_route.argtypes, lib.nq_t16_route.restype = [i64, cint], cint
    for fn in ("nq_dequant", "nq_linear", "nq_linear_bf16_64", *t16_kernels, "nq_layer_bf16", "nq_layer_t16_bf16",
               "nq_layer_t16_f32", "nq_t16_pack", "nq_t16_unpack", "nq_t16_dequant_t"):
        getattr(lib, fn).restype = cint
    return lib


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("NVILA_QUANT_NO_NATIVE"):
        return None
    try:
        lib = load_library()
    except (BuildError, OSError) as e:
        logger.info("native CPU int4 kernels unavailable (%s); using torch ops", e)
        return None
    amx = bool(lib.nq_caps() & CAP_AMX) and lib.nq_amx_init() == 0  # the OS grants AMX tile state to this process
    if amx:
        lib.nq_set_amx_min_tokens(AMX_MIN_TOKENS)
        lib.nq_set_amx_gemm_min_tokens(AMX_GEMM_MIN_TOKENS)
    global VNNI_MAX_TOKENS
    VNNI_MAX_TOKENS = vnni_max_tokens_default(amx, VNNI_MAX_TOKENS)
    lib.nq_set_vnni_max_tokens(VNNI_MAX_TOKENS, 0)
    lib.nq_set_vnni_max_tokens(VNNI_F32_MAX_TOKENS, 1)
    return lib


def vnni_max_tokens_default(amx_granted: bool, current: int) -> int:
    """The bf16 VNNI threshold once it is known whether the OS grants AMX: on an AMX-class CPU where it does not (Linux
    before 5.16, some hypervisors) the tokens AMX would take fall to the vdpbf16ps kernel, which the VNNI one beats at
    every count below the dense path (same VM with AMX off, 4096x4096: 8 / 32 / 64 tokens 1.7 vs 2.8 ms / 6.7 vs 10.9
    / 13.8 vs 21.6): 64 there. ``current`` otherwise, and whenever NVILA_QUANT_CPU_VNNI_MAX_TOKENS is set."""
    if AMX_CPU and not amx_granted and os.environ.get("NVILA_QUANT_CPU_VNNI_MAX_TOKENS") is None:
        return 64
    return current


def amx_active() -> bool:
    """Whether the bf16 T16 kernel runs on AMX tiles here (from :data:`AMX_MIN_TOKENS` tokens)."""
    lib = _library()
    return lib is not None and bool(lib.nq_caps() & CAP_AMX) and lib.nq_amx_init() == 0 and AMX_MIN_TOKENS > 0


def set_amx_min_tokens(tokens: int) -> int:
    """Change from how many tokens the AMX kernel runs (0: never); returns the previous value."""
    global AMX_MIN_TOKENS
    old, AMX_MIN_TOKENS = AMX_MIN_TOKENS, tokens
    _set_threshold("nq_set_amx_min_tokens", tokens)
    return old


def set_amx_gemm_min_tokens(tokens: int) -> int:
    """Change from how many tokens the AMX GEMM (bf16-rounded weights) runs (0: never); returns the previous value."""
    global AMX_GEMM_MIN_TOKENS
    old, AMX_GEMM_MIN_TOKENS = AMX_GEMM_MIN_TOKENS, tokens
    _set_threshold("nq_set_amx_gemm_min_tokens", tokens)
    return old


def set_vnni_max_tokens(tokens: int, f32: bool = False) -> int:
    """Change up to how many tokens the VNNI kernel runs for bf16 (``f32``: fp32) activations (0: never);
    returns the previous value."""
    global VNNI_MAX_TOKENS, VNNI_F32_MAX_TOKENS
    old = VNNI_F32_MAX_TOKENS if f32 else VNNI_MAX_TOKENS
    if f32:
        VNNI_F32_MAX_TOKENS = tokens
    else:
        VNNI_MAX_TOKENS = tokens
    lib = _library()
    if lib is not None:
        lib.nq_set_vnni_max_tokens(tokens, int(f32))
    return old


_ROUTES = {0: None, 1: "vnni", 2: "amx-tiles", 3: "amx-gemm"}  # nq_t16_route's codes (int4_cpu.h)


def t16_route(x_dtype: torch.dtype, tokens: int) -> str | None:
    """Which native T16 kernel a call of ``tokens`` rows takes here, as the C dispatcher decides: "vnni-int8x2" (bf16
    x as two int8 parts), "vnni-int8x4" (fp32 x: two 15-bit parts as int8 pairs), "amx-tiles", "amx-gemm", "avx512-bf16",
    "avx512-fma" / "avx2-fma" (fp32 weights), or None (no T16 kernel)."""
    kernel = t16_kernel(x_dtype)
    if kernel is None:
        return None
    f32 = kernel == "f32"
    route = _ROUTES[_library().nq_t16_route(tokens, int(f32))]
    if route == "vnni":
        return "vnni-int8x4" if f32 else "vnni-int8x2"
    if route is not None:
        return route
    if not f32:
        return "avx512-bf16"
    return "avx512-fma" if native_caps() & CAP_F32 else "avx2-fma"


@contextlib.contextmanager
def avx512_bf16_only() -> Iterator[None]:
    """Within the block the T16 kernels run on AVX-512 at every token count (bf16: vdpbf16ps, fp32: FMA): no AMX, no
    VNNI (benchmarks and tests compare)."""
    old = set_amx_min_tokens(0), set_amx_gemm_min_tokens(0), set_vnni_max_tokens(0), set_vnni_max_tokens(0, f32=True)
    try:
        yield
    finally:
        set_amx_min_tokens(old[0])
        set_amx_gemm_min_tokens(old[1])
        set_vnni_max_tokens(old[2])
        set_vnni_max_tokens(old[3], f32=True)


def _set_threshold(setter: str, tokens: int) -> None:
    lib = _library()
    if lib is not None and lib.nq_caps() & CAP_AMX:
        getattr(lib, setter)(tokens)


@functools.lru_cache(maxsize=1)
def native_caps() -> int:
    """Bit 1: fp32 kernels (AVX-512F); bit 2: bf16 kernels (AVX-512 BW + BF16); bit 4: the fp32 T16 kernel
    (AVX-512 BW, or AVX2 + FMA + F16C); bit 8: the AMX T16 kernels are compiled in; bit 16: the VNNI T16
    kernels (bf16 ones + AVX-512 VNNI); 0 without the library."""
    lib = _library()
    return 0 if lib is None else int(lib.nq_caps())


def native_available() -> bool:
    return native_caps() != 0


# how the kernels read scales: as QuantLinear stores them (the checkpoint's dtype); zero points are uint8
SCALE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _meta_ok(scale: torch.Tensor, zero: torch.Tensor) -> bool:
    return scale.dtype in SCALE_KINDS and zero.dtype == torch.uint8


def _dtype_cap(dtype: torch.dtype) -> int:
    return {torch.float32: CAP_F32, torch.bfloat16: CAP_BF16}.get(dtype, 0)


def native_linear_support(dtype: torch.dtype, in_features: int, group: int) -> bool:
    """Whether the native kernels take activations/weights of ``dtype`` for this K and group size."""
    cap = _dtype_cap(dtype)
    return bool(cap and native_caps() & cap and in_features % 32 == 0 and group % 32 == 0 and in_features % group == 0)


def t16_shape_ok(out_features: int, in_features: int, group: int) -> bool:
    """Whether a layer's shape fits the T16 layout (csrc/int4_cpu.c: N % 16, K and group % 64)."""
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


HUGE_PAGE = 2 * 1024**2  # x86-64 transparent huge page
HUGE_PAGES = bool(env_number("NVILA_QUANT_CPU_HUGE_PAGES", 1))  # 0: packed CPU weights in torch's memory, 4 KB pages


def empty_huge_pages(nbytes: int) -> torch.Tensor:
    """Uninitialised (nbytes,) uint8 CPU tensor whose whole 2 MB spans the OS may back with transparent huge pages
    (Linux, THP "madvise" or "always"; a plain ``torch.empty`` elsewhere and below 2 MB). A layer's weight stream then
    crosses no 4 KB page boundaries (TLB misses): CPU B, 1-token kernel at 4096x4096, cold caches, 4-7% less time.
    Anonymous memory mapped on its own, untouched until written, so the pages come fresh; its tail past the last
    whole 2 MB stays in 4 KB pages (no memory beyond nbytes is touched)."""
    if not HUGE_PAGES or nbytes < HUGE_PAGE or not (hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS")):
        return torch.empty(nbytes, dtype=torch.uint8)
    # private (a shared anonymous map is shmem, whose huge pages are off by default); page aligned, and the slack
    # makes room for a 2 MB aligned start
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(buf)) % HUGE_PAGE
    with contextlib.suppress(OSError):  # (a kernel built without THP refuses the advice: 4 KB pages, as torch's)
        buf.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=start)  # (keeps buf mapped while alive)


def _t16_convert(name: str, src: torch.Tensor) -> torch.Tensor:
    n, k = src.shape[0], src.shape[1] * 2
    if src.device.type != "cpu" or src.dtype != torch.uint8 or n % 16 or k % 64:
        raise ValueError(f"T16 layout needs a CPU uint8 (N, K/2) tensor with N % 16 == 0 and K % 64 == 0, got "
                         f"{src.dtype} {tuple(src.shape)} on {src.device}")
    src = src.contiguous()
    # packed weights live as long as the layer and are streamed at every call: on huge pages
    out = empty_huge_pages(src.numel()).view(src.shape) if name == "nq_t16_pack" else torch.empty_like(src)
    if getattr(_library(), name)(src.data_ptr(), out.data_ptr(), n, k) != 0:
        raise RuntimeError(f"{name} failed for ({n}, {k})")
    return out


def t16_pack(rows: torch.Tensor) -> torch.Tensor:
    """Nibble rows (N, K/2) uint8 -> the T16 layout (same shape and bytes, 16 rows interleaved; see int4_cpu.c)."""
    return _t16_convert("nq_t16_pack", rows)


def t16_unpack(t16: torch.Tensor) -> torch.Tensor:
    """The T16 layout -> nibble rows (N, K/2) uint8. A slice of whole 16-row units unpacks on its own."""
    return _t16_convert("nq_t16_unpack", t16)


def t16_linear(x: torch.Tensor, t16: torch.Tensor, scale_t: torch.Tensor, zero_t: torch.Tensor,
               bias: torch.Tensor | None, group: int) -> torch.Tensor:
    """x (M, K) bf16 / fp16 / fp32 -> (M, N) in x's dtype with T16 weights (N, K/2), scale_t (K/G, N) fp32/bf16/fp16,
    zero_t (K/G, N) uint8, bias (N,) fp32 (all contiguous), on the :func:`t16_kernel` for x's dtype."""
    m, k = x.shape
    n = t16.shape[0]
    kernel = t16_kernel(x.dtype)
    if kernel is None or not _meta_ok(scale_t, zero_t) or scale_t.shape != (k // group, n):
        raise ValueError(f"t16_linear: no T16 kernel for {x.dtype} here, or scales not (K/G, N): {tuple(scale_t.shape)}")
    compute = torch.bfloat16 if kernel == "bf16" else torch.float32
    xc = x.to(compute).contiguous()
    out = torch.empty(m, n, dtype=compute)
    fn = _library().nq_t16_bf16 if kernel == "bf16" else _library().nq_t16_f32
    rc = fn(xc.data_ptr(), t16.data_ptr(), scale_t.data_ptr(), zero_t.data_ptr(), None if bias is None else bias.data_ptr(),
            out.data_ptr(), m, n, k, group, torch.get_num_threads(), SCALE_KINDS[scale_t.dtype])
    if rc != 0:
        raise RuntimeError(f"native T16 linear failed with code {rc} for x {tuple(x.shape)}, N={n}, group {group}")
    return out if out.dtype == x.dtype else out.to(x.dtype)


def t16_dequantize_t(t16: torch.Tensor, scale_t: torch.Tensor, zero_t: torch.Tensor, group: int, dtype: torch.dtype,
                     r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """W^T (K, r1 - r0) in ``dtype`` (fp32 or bf16) for output rows r0:r1 (multiples of 16) of T16 weights (N, K/2)
    with scale_t / zero_t (K/G, N): (q - z) * s rounded once, bit-identical to :func:`dequantize_nibbles`, read from
    the T16 layout directly. Written into ``out`` when given; None where the native kernel cannot (the caller unpacks
    to rows instead)."""
    n, k = t16.shape[0], t16.shape[1] * 2
    lib = _library()
    if (lib is None or not native_caps() & CAP_T16_F32 or dtype not in (torch.float32, torch.bfloat16)
            or (dtype == torch.bfloat16 and not native_caps() & CAP_BF16) or not _meta_ok(scale_t, zero_t)
            or r0 % 16 or r1 % 16 or not 0 <= r0 <= r1 <= n):
        return None
    if out is None:
        out = torch.empty(k, r1 - r0, dtype=dtype)
    rc = lib.nq_t16_dequant_t(t16.data_ptr(), scale_t.data_ptr(), zero_t.data_ptr(), out.data_ptr(), n, k, group,
                              r0 // 16, (r1 - r0) // 16, int(dtype == torch.bfloat16), torch.get_num_threads(),
                              SCALE_KINDS[scale_t.dtype])
    return out if rc == 0 else None


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q: (N, K) uint8 in [0, 15], K even -> (N, K/2) uint8 (low nibble = even k)."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> q (N, K) uint8."""
    n, half = packed.shape
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(n, 2 * half)


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
    native = (
        packed.device.type == "cpu" and native_linear_support(dtype, k, group)
        and _meta_ok(scale, zero)
    )
    if not native:
        return out.copy_(dequantize(unpack_nibbles(packed), scale.float(), zero, group))  # fp32, then out's dtype
    packed, scale, zero = packed.contiguous(), scale.contiguous(), zero.contiguous()
    rc = _library().nq_dequant(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), out.data_ptr(), n, k, group,
                               int(dtype == torch.bfloat16), torch.get_num_threads(), SCALE_KINDS[scale.dtype])
    if rc != 0:
        raise RuntimeError(f"native dequantize failed with code {rc} for ({n}, {k}), group {group}")
    return out


def native_linear(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
    group: int,
) -> torch.Tensor:
    """Fused dequantize-GEMM: x (M, K) bf16 or fp32 -> (M, N) in x's dtype. scale (N, K/G) fp32/bf16/fp16 and
    zero (N, K/G) uint8, contiguous; bias (N,) fp32.

    Callers check :func:`native_linear_support` first."""
    m, k = x.shape
    n = packed.shape[0]
    if not _meta_ok(scale, zero):
        raise ValueError(f"native kernels read fp32/bf16/fp16 scales and uint8 zeros, got {scale.dtype}, {zero.dtype}")
    kind = SCALE_KINDS[scale.dtype]
    out = torch.empty(m, n, dtype=x.dtype)
    bias_ptr = None if bias is None else bias.data_ptr()
    x = x.contiguous()
    if x.dtype == torch.bfloat16 and k % 64 == 0 and group % 64 == 0:
        rc = _library().nq_linear_bf16_64(x.data_ptr(), packed.data_ptr(), scale.data_ptr(), zero.data_ptr(),
                                          bias_ptr, out.data_ptr(), m, n, k, group, torch.get_num_threads(), kind)
    else:
        rc = _library().nq_linear(x.data_ptr(), packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), bias_ptr,
                                  out.data_ptr(), m, n, k, group, int(x.dtype == torch.bfloat16),
                                  torch.get_num_threads(), kind)
    if rc != 0:
        raise RuntimeError(f"native int4 linear failed with code {rc} for x {tuple(x.shape)}, N={n}, group {group}")
    return out


class _LayerStruct(ctypes.Structure):  # nq_layer in csrc/int4_cpu.c
    _fields_ = [("q", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("group", ctypes.c_int64),
                ("scale_kind", ctypes.c_int64)]


class NativeLayer:
    """A fused kernel bound once to one layer's tensors, so a call passes only x, the output and the token count (a
    per-call cost that shows when caches are cold: every layer of a decode step). ``dtype`` is the activations'
    (and output's) dtype. Nibble rows: the bf16 kernel; requires bf16 support, K and group multiples of 64
    (:meth:`supports`). ``t16=True``: packed is the T16 layout, scale / zero are transposed (K/G, N), and the kernel
    is :func:`t16_kernel`'s for ``dtype`` ("bf16" needs bf16 activations, "f32" fp32 ones)."""

    __slots__ = ("call", "dtype", "k", "keep", "max_numel", "n", "outs", "ptr", "struct")

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
                 group: int, t16: bool = False, dtype: torch.dtype = torch.bfloat16) -> None:
        n, k = packed.shape[0], packed.shape[1] * 2
        kernel = t16_kernel(dtype) if t16 and t16_shape_ok(n, k, group) else None
        ok = (kernel == "bf16" and dtype == torch.bfloat16) or (kernel == "f32" and dtype == torch.float32) if t16 else (
            dtype == torch.bfloat16 and self.supports(k, group))
        if not ok or not _meta_ok(scale, zero):
            raise ValueError(f"NativeLayer: no native kernel for {dtype} activations with N={n}, K={k}, group={group}")
        self.keep = tuple(t.contiguous() for t in (packed, scale, zero) + (() if bias is None else (bias,)))
        self.struct = _LayerStruct(*(t.data_ptr() for t in self.keep[:3]), None if bias is None else self.keep[3].data_ptr(),
                                   n, k, group, SCALE_KINDS[scale.dtype])
        self.ptr, self.n, self.k, self.dtype = ctypes.addressof(self.struct), n, k, dtype
        lib = _library()
        self.call = (lib.nq_layer_t16_f32 if kernel == "f32" else lib.nq_layer_t16_bf16) if t16 else lib.nq_layer_bf16
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
        out = torch.empty_like(entry[0])  # (on cold caches ~30 us less than new_empty / torch.empty with a size)
        rc = self.call(self.ptr, x.data_ptr(), out.data_ptr(), entry[1], torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"native int4 linear failed with code {rc} for x {tuple(x.shape)}, N={self.n}")
        return out
