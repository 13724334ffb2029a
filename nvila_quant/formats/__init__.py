"""Packed int4/intN weight formats: the canonical in-memory form and bit-exact packers per format."""

from nvila_quant.formats.qtensor import QTensor

__all__ = ["QTensor"]
