"""CPU backend: dispatch (which kernel runs a layer), native bindings, the T16 layout, settings, C sources."""

from nvila_quant.kernels.cpu.dispatch import CpuState, cpu_linear, cpu_support, prepare_cpu, t16_wanted
from nvila_quant.kernels.cpu.settings import CpuSettings, cpu_settings

__all__ = ["CpuSettings", "CpuState", "cpu_linear", "cpu_settings", "cpu_support", "prepare_cpu", "t16_wanted"]
