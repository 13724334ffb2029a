"""The "mma" weight layout of the CUDA tensor-core kernels (``w4a16_mma.cu``): a load-time permutation of nibbles.

Nibble rows (N, K/2) uint8 become the same number of bytes ordered as (N/32, K/32, 32 lanes, 4 words): one 16-byte
load gives a lane its mma.sync m16n8k16 A fragments for two 16-row tiles and two 16-wide k steps. Word
w = 2 nt + j of lane l = 4 g + t holds, in nibble i = p0 + 2 p1 + 4 h, q[32 b + 16 nt + 8 p0 + g][32 c + 8 t +
4 j + 2 p1 + h] (block b, chunk c). Scales and zero points are transposed to (K/G, N). Pure torch: packs on any
device.
"""

from __future__ import annotations

import torch

from nvila_quant.numerics.nibbles import pack_nibbles, unpack_nibbles

__all__ = ["mma_layout_reason", "mma_pack", "mma_unpack"]

# (b, nt, p0, g, c, t, j, p1, h): the row/column digits of q; the packed order is (b, c, g, t, nt, j, h, p1, p0)
_TO_PACKED = (0, 4, 3, 5, 1, 6, 8, 7, 2)
_FROM_PACKED = (0, 4, 8, 2, 1, 3, 5, 7, 6)


def mma_layout_reason(bits: int, out_features: int, in_features: int, group: int) -> str | None:
    """None when a layer can take the mma layout, else why not."""
    if bits != 4:
        return f"bits={bits}"
    if out_features % 32 or in_features % 32 or group % 32 or in_features % group:
        return (f"needs out_features, in_features and group size multiples of 32 (got N={out_features}, "
                f"K={in_features}, group={group})")
    return None


def _check(t: torch.Tensor) -> tuple[int, int]:
    if t.dtype != torch.uint8 or t.dim() != 2 or t.shape[0] % 32 or (2 * t.shape[1]) % 32:
        raise ValueError(f"mma layout: expected (N, K/2) uint8 with N and K multiples of 32, got {t.dtype} "
                         f"{tuple(t.shape)}")
    return t.shape[0], 2 * t.shape[1]


def mma_pack(rows: torch.Tensor) -> torch.Tensor:
    """Nibble rows (N, K/2) uint8 -> the mma layout (same shape and bytes, permuted)."""
    n, k = _check(rows)
    q = unpack_nibbles(rows).view(n // 32, 2, 2, 8, k // 32, 4, 2, 2, 2).permute(_TO_PACKED).reshape(-1, 2)
    return (q[:, 0] | (q[:, 1] << 4)).view(n, k // 2)


def mma_unpack(packed: torch.Tensor) -> torch.Tensor:
    """The mma layout -> nibble rows (N, K/2) uint8."""
    n, k = _check(packed)
    q = torch.stack([packed & 15, packed >> 4], dim=-1).view(n // 32, k // 32, 8, 4, 2, 2, 2, 2, 2)
    return pack_nibbles(q.permute(_FROM_PACKED).reshape(n, k))
