"""Int4 dequant-GEMM kernels and the quantized Linear: CPU (native AVX-512 / torch int4), CUDA (own W4A16), reference."""

from nvila_quant.kernels.linear import BACKENDS, QuantLinear, reference_linear

__all__ = ["BACKENDS", "QuantLinear", "reference_linear"]
