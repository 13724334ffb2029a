"""Quantization: numerics (primitives), AWQ search and the block-by-block runner."""
