"""Seeded tiny NVILA checkpoints in the real layouts, for tests, the demo and ``nvila-quant make-tiny``."""

from nvila_quant.testing.factory import TinySpec, make_tiny

__all__ = ["TinySpec", "make_tiny"]
