"""Bit packing of small integers into int32 words: every width round-trips, row blocks equal the whole, slot order."""

from __future__ import annotations

import pytest
import torch

from nvila_quant.numerics import bitpack
from nvila_quant.numerics.bitpack import pack_int32, unpack_int32


@pytest.mark.parametrize("bits", range(1, 9))
def test_bitpack_roundtrip_every_width(bits: int) -> None:
    x = torch.randint(0, 2**bits, (5, 37), dtype=torch.uint8)
    packed = pack_int32(x, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-37 // (32 // bits)))
    assert torch.equal(unpack_int32(packed, bits, 37), x)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_bitpack_row_blocks_match_whole(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large tensors are (un)packed in blocks of rows (bounded int64 intermediates): same words, same values."""
    gen = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (37, 70), generator=gen, dtype=torch.uint8)
    order = list(reversed(range(32 // bits)))
    whole = (pack_int32(values, bits, order), bitpack.pack_dense_int32(values, bits))
    monkeypatch.setattr(bitpack, "_BLOCK_VALUES", 150)  # 2 rows per block, an odd last one
    blocks = (pack_int32(values, bits, order), bitpack.pack_dense_int32(values, bits))
    assert all(torch.equal(a, b) for a, b in zip(whole, blocks, strict=True))
    assert torch.equal(unpack_int32(blocks[0], bits, 70, order), values)
    assert torch.equal(bitpack.unpack_dense_int32(blocks[1], bits, 70), values)


def test_bitpack_order_and_sign_bit() -> None:
    x = torch.tensor([[15, 1, 2, 3, 4, 5, 6, 15]], dtype=torch.uint8)
    word = pack_int32(x, 4, (0, 2, 4, 6, 1, 3, 5, 7))
    expect = sum(int(x[0, c]) << (4 * i) for i, c in enumerate((0, 2, 4, 6, 1, 3, 5, 7)))
    assert word.item() == expect - 2**32  # top nibble 15: negative int32 with the same bits
    assert torch.equal(unpack_int32(word, 4, 8, (0, 2, 4, 6, 1, 3, 5, 7)), x)
    with pytest.raises(ValueError, match="cannot hold exactly"):
        unpack_int32(word, 4, 9)
