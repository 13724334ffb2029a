"""Nibble rows: 4-bit values packed two per byte along the input dimension (the runtime's weight layout).

    q: (N, K) uint8 in [0, 15], K even  <->  (N, K/2) uint8, byte j of row n = q[n, 2j] | q[n, 2j + 1] << 4
"""

from __future__ import annotations

import torch

__all__ = ["pack_nibbles", "unpack_nibbles"]


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q: (N, K) uint8 in [0, 15], K even -> (N, K/2) uint8 (low nibble = even k)."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> q (N, K) uint8."""
    n, half = packed.shape
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(n, 2 * half)
