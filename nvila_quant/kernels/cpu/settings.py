"""Every ``NVILA_QUANT_CPU_*`` knob of the CPU backend in one object, read from the environment when first used.

None means the measured default for this CPU (see ``benchmarks/README.md`` for the measurements). Fields may be
assigned (validated) or changed for a block with :func:`nvila_quant.settings.overrides`; listeners registered by the
native bindings and the dispatcher re-apply the thresholds and drop cached plans.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nvila_quant.settings import Lazy, Settings, knob

__all__ = ["CpuSettings", "cpu_settings", "on_cpu_settings_change"]

_LISTENERS: list[Callable[[str], None]] = []


@dataclass
class CpuSettings(Settings):
    """CPU backend knobs (variable in each field's declaration)."""

    # the native library off: torch's int4 op and the dequantize paths only
    no_native: bool = knob("NVILA_QUANT_NO_NATIVE", False, bool)
    # "torch": torch's int4 op as the few-token kernel wherever it applies (compare / debug)
    kernel: str = knob("NVILA_QUANT_CPU_KERNEL", "auto", str, choices=("auto", "torch"))
    # token count from which dequantize + dense matmul runs (None: per kernel, dispatch.DENSE_MIN_TOKENS)
    dense_min_tokens: int | None = knob("NVILA_QUANT_CPU_DENSE_MIN_TOKENS", None, int, minimum=0, optional=True)
    # the dense path's block of dequantized rows in MB (0: one block; None: 512 rows below 256 tokens)
    chunk_mb: float | None = knob("NVILA_QUANT_CPU_CHUNK_MB", None, float, minimum=0, optional=True)
    # bf16 T16 kernel on AMX tiles from this many tokens (0: never)
    amx_min_tokens: int = knob("NVILA_QUANT_CPU_AMX_MIN_TOKENS", 2, int, minimum=0)
    # ... and as a tiled GEMM on weights dequantized once per call from this many (0: never)
    amx_gemm_min_tokens: int = knob("NVILA_QUANT_CPU_AMX_GEMM_MIN_TOKENS", 80, int, minimum=0)
    # bf16 activations as int8 parts on VNNI up to this many tokens (None: 4 on AMX CPUs, 64 if the OS refuses AMX,
    # 0 elsewhere; 0: never)
    vnni_max_tokens: int | None = knob("NVILA_QUANT_CPU_VNNI_MAX_TOKENS", None, int, minimum=0, optional=True)
    # fp32 activations as two 15-bit integer parts on VNNI up to this many tokens (None: 64)
    vnni_f32_max_tokens: int | None = knob("NVILA_QUANT_CPU_VNNI_F32_MAX_TOKENS", None, int, minimum=0, optional=True)
    # activations of few-token calls: "exact" (within the bf16 / fp32 output's rounding: the VNNI kernels' int8 parts
    # above, or vdpbf16ps / FMA) or "int8" (explicit opt-in, CPUs with AVX-512 VNNI: bf16, fp16 and fp32 x of calls up
    # to int8_max_tokens tokens quantized to ONE int8 per element, scale max|x| / 127 per 64-wide chunk, one vpdpbusd
    # per weight vector - the peers' kind of accuracy (llama.cpp's Q8_0 activations, ONNX Runtime's MatMulNBits level
    # 4): each element off by up to 1/254 of its chunk's largest; `nvila-quant compare --cpu-activations int8` shows
    # the cost in KL)
    activations: str = knob("NVILA_QUANT_CPU_ACTIVATIONS", "exact", str, choices=("exact", "int8"))
    # with activations "int8": up to this many tokens (None: 2 for bf16 / fp16 activations, 64 for fp32 ones:
    # native.INT8_MAX_TOKENS); more stay exact
    int8_max_tokens: int | None = knob("NVILA_QUANT_CPU_INT8_MAX_TOKENS", None, int, minimum=0, optional=True)
    # packed weights of 2 MB or more on transparent huge pages (Linux)
    huge_pages: bool = knob("NVILA_QUANT_CPU_HUGE_PAGES", True, bool)

    def changed(self, name: str) -> None:
        for listener in list(_LISTENERS):
            listener(name)


def on_cpu_settings_change(listener: Callable[[str], None]) -> None:
    """Call ``listener(field name)`` after any field of the CPU settings changes."""
    _LISTENERS.append(listener)


cpu_settings = Lazy(CpuSettings)
