"""Int4 dequant-GEMM kernels and the quantized Linear: CPU (native AVX-512 / torch int4), CUDA (own W4A16),
reference."""

from nvila_quant.kernels.linear import QuantLinear, reference_linear
from nvila_quant.kernels.settings import BACKENDS, KernelSettings, kernel_settings

__all__ = ["BACKENDS", "KernelSettings", "QuantLinear", "kernel_settings", "reference_linear"]
