"""Knobs of the kernels as a whole (which backend QuantLinear takes, where built libraries are cached), read from the
environment when first used. Per-device knobs: :mod:`.cpu.settings`, :mod:`.cuda.settings`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nvila_quant.settings import Lazy, Settings, knob

__all__ = ["BACKENDS", "KernelSettings", "kernel_settings"]

BACKENDS = ("auto", "cpu", "cuda", "reference")


@dataclass
class KernelSettings(Settings):
    """Backend of every QuantLinear a loader builds ("auto": the fast one for the input's device; "reference":
    dequantize + matmul, the oracle) and the folder of compiled kernel libraries (default
    ``~/.cache/nvila_quant``)."""

    backend: str = knob("NVILA_QUANT_BACKEND", "auto", str, choices=BACKENDS)
    cache: str | None = knob("NVILA_QUANT_CACHE", None, str, optional=True)

    def cache_dir(self) -> Path:
        return Path(self.cache or Path.home() / ".cache" / "nvila_quant") / "kernels"


kernel_settings = Lazy(KernelSettings)
