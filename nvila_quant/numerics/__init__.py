"""Pure tensor math: the quantizer, the canonical quantized-tensor type, bit and nibble packers, metrics.

Nothing here reads files, environment variables or devices beyond the tensors it is given.
"""

from nvila_quant.numerics.qtensor import QTensor
from nvila_quant.numerics.quantizer import compute_qparams, dequantize, group_count, pseudo_quantize, quantize

__all__ = ["QTensor", "compute_qparams", "dequantize", "group_count", "pseudo_quantize", "quantize"]
