"""Packed int4/intN weight formats: the canonical in-memory form and bit-exact packers per format."""

from nvila_quant.formats.checkpoint import (
    FORMATS,
    QuantizedCheckpointWriter,
    QuantSpec,
    check_packable,
    convert_linear,
    detect_format,
    pack_linear,
    read_quantized_submodel,
    unpack_linear,
)
from nvila_quant.numerics.qtensor import QTensor

__all__ = [
    "FORMATS",
    "QTensor",
    "QuantSpec",
    "QuantizedCheckpointWriter",
    "check_packable",
    "convert_linear",
    "detect_format",
    "pack_linear",
    "read_quantized_submodel",
    "unpack_linear",
]
