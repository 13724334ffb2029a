"""Bit packing of small unsigned integers into 32-bit words (pure functions; every pack has an unpack).

Layout of :func:`pack_int32` for ``bits`` b and pack factor ``pf = 32 // b``:
    word j of a row, slot i (bits i*b .. i*b + b - 1) holds column ``j * pf + order[i]``
with ``order = 0..pf-1`` (sequential) unless given. Columns past the end are zero padded.
Words are returned as int32 holding the same 32 bits (two's complement reinterpretation).

:func:`pack_dense_int32` (compressed-tensors' layout) packs without padding bits: value ``c`` of a row occupies
bits ``c*b .. c*b + b - 1`` of the row's bit stream (little-endian words), crossing word boundaries where
``b`` does not divide 32, so 32 values take exactly ``b`` words. For b in {1, 2, 4, 8} it equals the
sequential :func:`pack_int32`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "as_int16_bits",
    "as_int32_bits",
    "dense_word_count",
    "pack_dense_int32",
    "pack_int32",
    "unpack_dense_int32",
    "unpack_int32",
    "word_count",
]


def word_count(n_values: int, bits: int) -> int:
    """Number of int32 words that hold ``n_values`` values of ``bits`` bits (padded)."""
    pf = 32 // bits
    return -(-n_values // pf)


def as_int32_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same low 32 bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def as_int16_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^16) -> int16 with the same low 16 bits."""
    return torch.where(x >= 2**15, x - 2**16, x).to(torch.int16)


def _check_order(order: Sequence[int] | None, pf: int) -> list[int] | None:
    if order is None:
        return None
    order = list(order)
    if sorted(order) != list(range(pf)):
        raise ValueError(f"order must be a permutation of 0..{pf - 1}, got {order}")
    return order


_BLOCK_VALUES = 1 << 22  # values per row block: the int64 intermediates of one block stay at tens of MB


def _by_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, values_per_row: int) -> torch.Tensor:
    """fn over blocks of x's rows, concatenated (rows pack independently): a large layer's int64 intermediates
    (8-20 bytes per value) are never all alive at once."""
    rows = max(1, _BLOCK_VALUES // max(values_per_row, 1))
    if x.shape[0] <= rows:
        return fn(x)
    return torch.cat([fn(x[i : i + rows]) for i in range(0, x.shape[0], rows)])


def pack_int32(values: torch.Tensor, bits: int, order: Sequence[int] | None = None) -> torch.Tensor:
    """values: (R, C) integers in [0, 2^bits) -> (R, ceil(C / (32 // bits))) int32, packed along dim 1."""
    if values.dim() != 2:
        raise ValueError(f"expected a 2-D tensor to pack, got shape {tuple(values.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    pf = 32 // bits
    order = _check_order(order, pf)
    c = values.shape[1]
    shifts = torch.arange(pf, dtype=torch.int64, device=values.device) * bits

    def block(rows: torch.Tensor) -> torch.Tensor:
        v = rows.to(torch.int64)
        if c % pf:
            v = F.pad(v, (0, pf - c % pf))
        v = v.reshape(rows.shape[0], -1, pf)  # (R, W, pf): column j*pf + t
        if order is not None:
            v = v[..., order]  # slot i <- column j*pf + order[i]
        return as_int32_bits((v << shifts).sum(-1))

    return _by_rows(block, values, c)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int, order: Sequence[int] | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: (R, W) int32 -> (R, cols) uint8 (padding dropped)."""
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"expected a 2-D int32 tensor to unpack, got {packed.dtype} {tuple(packed.shape)}")
    pf = 32 // bits
    order = _check_order(order, pf)
    w = packed.shape[1]
    if w * pf < cols or (w - 1) * pf >= max(cols, 1):
        raise ValueError(f"{w} packed words of {pf} values cannot hold exactly {cols} columns")
    shifts = torch.arange(pf, dtype=torch.int64, device=packed.device) * bits
    inverse = None if order is None else sorted(range(pf), key=order.__getitem__)  # column t sits in slot inverse[t]

    def block(rows: torch.Tensor) -> torch.Tensor:
        words = rows.to(torch.int64) & 0xFFFFFFFF
        v = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (R, W, pf): slot i
        if inverse is not None:
            v = v[..., inverse]
        return v.reshape(rows.shape[0], w * pf)[:, :cols].to(torch.uint8)

    return _by_rows(block, packed, w * pf)


def dense_word_count(n_values: int, bits: int) -> int:
    """Number of int32 words that hold ``n_values`` values of ``bits`` bits without padding bits."""
    return -(-n_values * bits // 32)


def _dense_slots(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For the 32 values of a ``bits``-word block: the word each starts in and its bit offset there."""
    start = torch.arange(32, dtype=torch.int64, device=device) * bits
    return start // 32, start % 32


def pack_dense_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """values: (R, C) integers in [0, 2^bits) -> (R, ceil(C * bits / 32)) int32, no padding bits (see above)."""
    if values.dim() != 2:
        raise ValueError(f"expected a 2-D tensor to pack, got shape {tuple(values.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    c = values.shape[1]
    word, offset = _dense_slots(bits, values.device)

    def block(rows: torch.Tensor) -> torch.Tensor:
        r = rows.shape[0]
        v = rows.to(torch.int64)
        if c % 32:
            v = F.pad(v, (0, 32 - c % 32))
        v = v.reshape(r, -1, 32)  # (R, blocks, 32)
        out = torch.zeros(r, v.shape[1], bits + 1, dtype=torch.int64, device=v.device)  # one spare word for spills
        out.scatter_add_(2, word.expand_as(v), (v << offset) & 0xFFFFFFFF)
        out.scatter_add_(2, (word + 1).expand_as(v), v >> (32 - offset))  # bits past the word end (0 if none)
        return as_int32_bits(out[..., :bits].reshape(r, -1)[:, : dense_word_count(c, bits)])

    return _by_rows(block, values, c)


def unpack_dense_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_dense_int32`: (R, W) int32 -> (R, cols) uint8."""
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"expected a 2-D int32 tensor to unpack, got {packed.dtype} {tuple(packed.shape)}")
    w = packed.shape[1]
    if w != dense_word_count(cols, bits):
        raise ValueError(f"{w} packed words of {bits}-bit values cannot hold exactly {cols} columns")
    blocks = -(-cols // 32)
    word, offset = _dense_slots(bits, packed.device)

    def block(rows: torch.Tensor) -> torch.Tensor:
        n = rows.shape[0]
        # (R, blocks, bits + 1): each block's words plus the next block's first (where a last value may spill)
        words = F.pad(rows.to(torch.int64) & 0xFFFFFFFF, (0, blocks * bits - w + 1)).unfold(1, bits + 1, bits)
        lo = torch.gather(words, 2, word.expand(n, blocks, 32)) >> offset
        hi = torch.gather(words, 2, (word + 1).expand(n, blocks, 32)) << (32 - offset)
        return ((lo | hi) & ((1 << bits) - 1)).reshape(n, blocks * 32)[:, :cols].to(torch.uint8)

    return _by_rows(block, packed, blocks * 32)
