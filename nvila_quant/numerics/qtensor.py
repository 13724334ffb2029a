"""The canonical in-memory form of a quantized linear weight; every on-disk format converts to/from it.

    w[n, k] ~= (q[n, k] - zero[n, k // G]) * scale[n, k // G]

Stored tensors:
    q:     (N, K) uint8, values in [0, 2^bits - 1] (symmetric weights are offset by 2^(bits-1))
    scale: (N, K/G) float (fp16 / bf16 / fp32)
    zero:  (N, K/G) int32, values in [0, 2^bits - 1] (2^(bits-1) everywhere when symmetric)
    bias:  (N,) float or None
G = group_size, or K when group_size == -1 (one group per output channel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nvila_quant.numerics.quantizer import dequantize, group_count, quantize

__all__ = ["QTensor"]


@dataclass
class QTensor:
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool = False
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.q.dim() != 2:
            raise ValueError(f"q must be (out_features, in_features), got shape {tuple(self.q.shape)}")
        n, k = self.q.shape
        if self.group_size != -1 and (self.group_size <= 0 or k % self.group_size):
            raise ValueError(f"group_size must divide in_features (got in_features={k}, group_size={self.group_size})")
        g = group_count(k, self.group_size)
        for name in ("scale", "zero"):
            t = getattr(self, name)
            if tuple(t.shape) != (n, g):
                raise ValueError(f"{name} must have shape ({n}, {g}) for q {tuple(self.q.shape)}, got {tuple(t.shape)}")
        if self.bias is not None and tuple(self.bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(self.bias.shape)}")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {self.bits}")

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    @property
    def effective_group_size(self) -> int:
        return self.in_features if self.group_size == -1 else self.group_size

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, bits: int = 4, group_size: int = 128, zero_point: bool = True,
        bias: torch.Tensor | None = None, scale_dtype: torch.dtype | None = None,
    ) -> QTensor:
        """Round-to-nearest quantization of a float (N, K) weight with the reference formula."""
        q, scale, zero = quantize(weight, bits, group_size, zero_point)
        return cls(q, scale.to(scale_dtype or weight.dtype), zero, bits, group_size, not zero_point, bias)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(N, K) float weight in ``dtype`` (default: the scale's dtype)."""
        return dequantize(self.q, self.scale, self.zero, self.group_size).to(dtype or self.scale.dtype)

    def to(self, device: torch.device | str) -> QTensor:
        return QTensor(
            self.q.to(device), self.scale.to(device), self.zero.to(device), self.bits, self.group_size,
            self.symmetric, None if self.bias is None else self.bias.to(device),
        )

    def equal(self, other: QTensor) -> bool:
        """Bit-exact equality of every stored tensor (values and dtypes) and field."""

        def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
            if a is None or b is None:
                return a is None and b is None
            return a.dtype == b.dtype and torch.equal(a, b)

        return (
            self.bits == other.bits and self.group_size == other.group_size and self.symmetric == other.symmetric
            and same(self.q, other.q) and same(self.zero, other.zero) and same(self.scale, other.scale)
            and same(self.bias, other.bias)
        )
