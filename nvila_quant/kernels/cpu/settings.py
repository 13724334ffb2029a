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
    # fp32 activations as two 15-bit integer parts on VNNI up to this many tokens (None: 64 on AMX CPUs, else 2)
    vnni_f32_max_tokens: int | None = knob("NVILA_QUANT_CPU_VNNI_F32_MAX_TOKENS", None, int, minimum=0, optional=True)
    # packed weights of 2 MB or more on transparent huge pages (Linux)
    huge_pages: bool = knob("NVILA_QUANT_CPU_HUGE_PAGES", True, bool)

    def changed(self, name: str) -> None:
        for listener in list(_LISTENERS):
            listener(name)


def on_cpu_settings_change(listener: Callable[[str], None]) -> None:
    """Call ``listener(field name)`` after any field of the CPU settings changes."""
    _LISTENERS.append(listener)


cpu_settings = Lazy(CpuSettings)
