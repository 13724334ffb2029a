"""What runs a packed linear on this machine: per device, activation dtype and token count, the kernel a call takes,
and why a faster one is not taken (``nvila-quant info --kernels``).

Two layer shapes are described, as the dispatchers tell them apart: "LLM-shaped" (N % 16 == 0, K and the group size
multiples of 64: every linear of NVILA's LLM and projector on CPU; N, K, group multiples of 32 for the CUDA tensor-core
layout) and "other" (K and the group size multiples of 32).
"""

from __future__ import annotations

from typing import Any

import torch

from nvila_quant.kernels.cpu import native
from nvila_quant.kernels.cpu.dispatch import (
    DENSE_MIN_TOKENS,
    cpu_dense_min_tokens,
    few_token_kernel,
    t16_wanted,
)
from nvila_quant.kernels.cpu.settings import cpu_settings
from nvila_quant.kernels.cuda import dispatch as cuda_dispatch
from nvila_quant.kernels.cuda.settings import cuda_settings
from nvila_quant.kernels.settings import kernel_settings

__all__ = ["describe_kernels", "format_kernels"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_LLM_SHAPE = (4096, 4096, 128)  # (N, K, group) standing for an LLM-shaped layer
_OTHER_SHAPE = (96, 96, 32)  # ... and for one only the nibble-row kernels take
_SCAN = 1024  # token counts scanned (every default threshold lies below; the C dispatcher changes route below 100)

_NAMES = {
    "vnni-int8x2": "T16 on VNNI, bf16 x as two int8 parts",
    "vnni-int8x4": "T16 on VNNI, fp32 x as two 15-bit parts",
    "vnni-int8x1": "T16 on VNNI, x as one int8 per element (NVILA_QUANT_CPU_ACTIVATIONS=int8: not exact)",
    "amx-tiles": "T16 on AMX tiles",
    "amx-gemm": "tiled AMX GEMM on weights dequantized to bf16 once per call",
    "avx512-bf16": "T16, AVX-512 BF16 (vdpbf16ps)",
    "avx512-fma": "T16, exact fp32 weights, AVX-512 FMA",
    "avx2-fma": "T16, exact fp32 weights, AVX2 FMA",
    "native-bf16": "nibble rows, AVX-512 BF16",
    "native-fp32": "nibble rows, AVX-512 FMA",
    "torch-int4": "torch's int4 op (_weight_int4pack_mm_for_cpu)",
    "dense": "dequantize (bit exact) + dense matmul",
    "reference": "reference: dequantize in fp32 + F.linear",
}


def _ranges(route: list[str]) -> list[dict[str, Any]]:
    """[kernel of 1 token, of 2, ...] -> [{"tokens": "1-4", "kernel": ...}, ...]; the last range is open."""
    out: list[dict[str, Any]] = []
    start = 1
    for m in range(1, len(route) + 1):
        if m == len(route) or route[m] != route[m - 1]:
            last = m == len(route)
            out.append({"tokens": f"{start}+" if last else (f"{start}" if start == m else f"{start}-{m}"),
                        "kernel": route[m - 1], "what": _NAMES.get(route[m - 1], route[m - 1])})
            start = m + 1
    return out


def _cpu_route(dtype: torch.dtype, shape: tuple[int, int, int]) -> list[str]:
    """The kernel a CPU call takes for 1 .. _SCAN tokens (one more than _SCAN stands for every larger count)."""
    n, k, group = shape
    settings = cpu_settings()
    if kernel_settings().backend == "reference":
        return ["reference"] * (_SCAN + 1)
    if t16_wanted(4, n, k, group, dtype):
        kernel = ("torch-int4" if settings.kernel == "torch" and dtype != torch.float32
                  else "native-t16" if native.t16_kernel(dtype) == "bf16" else "native-t16-f32")
        dense_from = cpu_dense_min_tokens(kernel)
        t16_dtype = torch.bfloat16 if kernel == "native-t16" else torch.float32
        route = []
        for m in range(1, _SCAN + 2):
            if m >= dense_from:
                route.append("dense")
            elif kernel == "torch-int4":
                route.append(kernel)
            else:
                route.append(native.t16_route(t16_dtype, m) or kernel)
        return route
    kernel = few_token_kernel(group, n, k, dtype)
    if kernel is None:
        return ["reference"] * (_SCAN + 1)
    dense_from = cpu_dense_min_tokens(kernel)
    return [kernel if m < dense_from else "dense" for m in range(1, _SCAN + 2)]


def _cpu_why_not() -> list[str]:
    """Faster CPU paths this machine does not take, and why."""
    why = []
    reason = native.unavailable_reason()
    if reason is not None:
        why.append(f"native int4 kernels: {reason}; {native.SLOW_PATH}")
        return why
    caps = native.native_caps()
    if not caps & native.CAP_BF16:
        why.append("no AVX-512 BF16: bf16 / fp16 activations run on the fp32 T16 kernel (converted) or torch's op")
    if not caps & native.CAP_VNNI:
        why.append("no AVX-512 VNNI: no integer-activation kernels for few tokens")
    if native.AMX_CPU and not native.amx_active():
        why.append("AMX tiles not used: the OS refused AMX tile state to this process, or "
                   "NVILA_QUANT_CPU_AMX_MIN_TOKENS=0")
    elif not native.AMX_CPU:
        why.append("no AMX tiles on this CPU (Sapphire Rapids and later have them): 5+ tokens stay on AVX-512")
    return why


def _cuda() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"available": False, "why_not": ["no CUDA device (torch.cuda.is_available() is False)"]}
    devices = []
    for index in range(torch.cuda.device_count()):
        name = torch.cuda.get_device_name(index)
        reason = cuda_dispatch.cuda_support(4, 128, 4096, 4096, torch.float16, device_index=index)
        entry: dict[str, Any] = {"index": index, "name": name,
                                 "capability": ".".join(map(str, torch.cuda.get_device_capability(index)))}
        if reason is not None:
            entry["why_not"] = [f"CUDA int4 kernels: {reason}; packed linears run the reference backend there"]
            devices.append(entry)
            continue
        check = cuda_dispatch.mma_self_check(index)
        mma_max = cuda_settings().mma_max_tokens
        many = ("tiled tensor-core GEMM" if cuda_settings().gemm == "fused" else "dequantize + cuBLAS")
        entry["fp16/bf16"] = {
            "LLM-shaped layers (mma layout)": [{"tokens": f"1-{mma_max}", "what": "tensor-core skinny GEMM"},
                                               {"tokens": f"{mma_max + 1}+", "what": many}]
            if check is None else [{"tokens": "1-4", "what": "nibble-row GEMV"},
                                   {"tokens": "5+", "what": "dequantize + cuBLAS"}],
            "other layers": [{"tokens": f"1-{cuda_dispatch.GEMV_MAX_TOKENS}", "what": "nibble-row GEMV"},
                             {"tokens": f"{cuda_dispatch.GEMV_MAX_TOKENS + 1}+", "what": "dequantize + cuBLAS"}],
        }
        entry["fp32"] = "reference (the CUDA kernels take fp16 / bf16 activations)"
        entry["why_not"] = [] if check is None else [f"tensor-core path off: {check}"]
        devices.append(entry)
    return {"available": True, "devices": devices}


def describe_kernels() -> dict[str, Any]:
    """Per device and activation dtype, the kernel each token-count range takes, and why faster ones are not."""
    cpu: dict[str, Any] = {"native": native.unavailable_reason() is None, "backend": kernel_settings().backend}
    if cpu["native"]:
        caps = native.native_caps()
        cpu["features"] = [name for bit, name in ((native.CAP_F32, "avx512-fp32"), (native.CAP_BF16, "avx512-bf16"),
                                                  (native.CAP_T16_F32, "t16-fp32"), (native.CAP_VNNI, "vnni"),
                                                  (native.CAP_AMX, "amx")) if caps & bit]
        cpu["amx_active"] = native.amx_active()
    for label, dtype in DTYPES.items():
        cpu[label] = {"LLM-shaped layers": _ranges(_cpu_route(dtype, _LLM_SHAPE)),
                      "other layers": _ranges(_cpu_route(dtype, _OTHER_SHAPE))}
    cpu["why_not"] = _cpu_why_not()
    return {"cpu": cpu, "cuda": _cuda(), "dense_min_tokens": dict(DENSE_MIN_TOKENS)}


def format_kernels(d: dict[str, Any]) -> str:
    """The description as a few lines per device."""
    cpu = d["cpu"]
    lines = ["CPU: native int4 kernels " + (f"built ({', '.join(cpu['features'])})" if cpu["native"] else "unavailable")
             + ("" if cpu["backend"] == "auto" else f"; backend forced to {cpu['backend']!r} (NVILA_QUANT_BACKEND)")]
    for label in DTYPES:
        for layers, ranges in cpu[label].items():
            what = "fp16 activations (computed in bf16)" if label == "fp16" else f"{label} activations"
            lines.append(f"  {what}, {layers}: "
                         + "; ".join(f"{r['tokens']} tokens: {r['what']}" for r in ranges))
    lines += [f"  not taken: {w}" for w in cpu["why_not"]]
    cuda = d["cuda"]
    if not cuda["available"]:
        lines.append("CUDA: " + "; ".join(cuda["why_not"]))
    for dev in cuda.get("devices", []):
        lines.append(f"CUDA:{dev['index']} {dev['name']} (compute capability {dev['capability']})")
        for layers, ranges in (dev.get("fp16/bf16") or {}).items():
            lines.append(f"  fp16/bf16 activations, {layers}: "
                         + "; ".join(f"{r['tokens']} tokens: {r['what']}" for r in ranges))
        if "fp32" in dev:
            lines.append(f"  fp32 activations: {dev['fp32']}")
        lines += [f"  not taken: {w}" for w in dev.get("why_not", [])]
    return "\n".join(lines)
