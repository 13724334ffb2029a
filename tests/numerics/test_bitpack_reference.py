"""Bit packers against reference packers written with Python integers, word counts, row blocks, exact errors;
nibble rows against hand-computed bytes."""

from __future__ import annotations

import pytest
import torch

from nvila_quant.numerics import bitpack
from nvila_quant.numerics.bitpack import (
    dense_word_count,
    pack_dense_int32,
    pack_int32,
    unpack_dense_int32,
    unpack_int32,
    word_count,
)
from nvila_quant.numerics.nibbles import pack_nibbles, unpack_nibbles


def _raises(exc: type[BaseException], message: str, fn, *args) -> None:
    with pytest.raises(exc) as info:
        fn(*args)
    assert str(info.value) == message


def _signed(word: int) -> int:
    return word - 2**32 if word >= 2**31 else word


def ref_pack(rows: list[list[int]], bits: int, order: list[int] | None = None) -> list[list[int]]:
    """Word j of a row, slot i (bits i*b ..) holds column j*pf + order[i]; missing columns are 0."""
    pf = 32 // bits
    order = list(range(pf)) if order is None else order
    out = []
    for row in rows:
        words = []
        for j in range(-(-len(row) // pf)):
            word = 0
            for i in range(pf):
                c = j * pf + order[i]
                word |= (row[c] if c < len(row) else 0) << (i * bits)
            words.append(_signed(word))
        out.append(words)
    return out


def ref_pack_dense(rows: list[list[int]], bits: int) -> list[list[int]]:
    """One little-endian bit stream per row, value c at bits c*b .., cut into ceil(C*b/32) words."""
    out = []
    for row in rows:
        stream = sum(v << (c * bits) for c, v in enumerate(row))
        out.append([_signed((stream >> (32 * w)) & 0xFFFFFFFF) for w in range(-(-len(row) * bits // 32))])
    return out


def test_word_counts() -> None:
    assert [word_count(n, 4) for n in (0, 1, 8, 9, 37)] == [0, 1, 1, 2, 5]
    assert [word_count(n, 3) for n in (10, 11, 20, 21)] == [1, 2, 2, 3]  # 10 values of 3 bits per word
    assert [word_count(n, 8) for n in (4, 5)] == [1, 2] and word_count(32, 1) == 1 and word_count(33, 1) == 2
    assert [dense_word_count(n, 3) for n in (0, 1, 10, 11, 32, 33)] == [0, 1, 1, 2, 3, 4]
    assert [dense_word_count(n, 5) for n in (6, 7, 32)] == [1, 2, 5] and dense_word_count(64, 8) == 16
    assert all(type(f(37, b)) is int for f in (word_count, dense_word_count) for b in (3, 4))


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_int32_equals_reference(bits: int) -> None:
    pf = 32 // bits
    gen = torch.Generator().manual_seed(bits)
    perm = torch.randperm(pf, generator=gen).tolist()
    for cols in sorted({1, pf - 1, pf, pf + 1, 3 * pf + 2} - {0}):
        values = torch.randint(0, 2**bits, (3, cols), generator=gen, dtype=torch.uint8)
        values[0, :] = 2**bits - 1  # every bit set, including bit 31 where pf * bits == 32
        for order in (None, perm):
            packed = pack_int32(values, bits, order)
            assert packed.dtype == torch.int32 and packed.tolist() == ref_pack(values.tolist(), bits, order)
            back = unpack_int32(packed, bits, cols, order)
            assert back.dtype == torch.uint8 and torch.equal(back, values)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_dense_int32_equals_reference(bits: int) -> None:
    gen = torch.Generator().manual_seed(10 + bits)
    for cols in (1, 31, 32, 33, 70):
        values = torch.randint(0, 2**bits, (3, cols), generator=gen, dtype=torch.uint8)
        values[0, :] = 2**bits - 1
        packed = pack_dense_int32(values, bits)
        assert packed.dtype == torch.int32 and packed.tolist() == ref_pack_dense(values.tolist(), bits)
        back = unpack_dense_int32(packed, bits, cols)
        assert back.dtype == torch.uint8 and torch.equal(back, values)


def test_hand_computed_words() -> None:
    assert pack_int32(torch.tensor([[1, 2, 3]]), 4).tolist() == [[0x321]]
    assert pack_int32(torch.tensor([[1, 2, 3]]), 4, [1, 0, 2, 3, 4, 5, 6, 7]).tolist() == [[0x312]]
    assert pack_int32(torch.tensor([[255, 1, 0, 128, 7]]), 8).tolist() == [[_signed(0x800001FF), 7]]
    # 3 bits: 10 values per word, the top 2 bits unused
    assert pack_int32(torch.tensor([[7] * 11]), 3).tolist() == [[2**30 - 1, 7]]
    # dense 3 bits: value 10 occupies bits 30..32, crossing into the second word
    assert pack_dense_int32(torch.tensor([[0] * 10 + [7]]), 3).tolist() == [[_signed(3 << 30), 1]]
    assert unpack_dense_int32(torch.tensor([[_signed(3 << 30), 1]], dtype=torch.int32), 3, 11).tolist() == [
        [0] * 10 + [7]]
    assert unpack_int32(torch.tensor([[-1]], dtype=torch.int32), 4, 8).tolist() == [[15] * 8]


def test_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of at most _BLOCK_VALUES values (at least one row each), concatenated in order."""
    calls: list[int] = []

    def spy(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x * 2

    x = torch.arange(7 * 3).reshape(7, 3)
    monkeypatch.setattr(bitpack, "_BLOCK_VALUES", 6)
    assert torch.equal(bitpack._by_rows(spy, x, 3), x * 2) and calls == [2, 2, 2, 1]
    calls.clear()
    assert torch.equal(bitpack._by_rows(spy, x, 100), x * 2) and calls == [1] * 7  # a row above the limit: 1 row
    calls.clear()
    assert torch.equal(bitpack._by_rows(spy, x, 0), x * 2) and calls == [6, 1]  # empty rows count as 1 value
    calls.clear()
    monkeypatch.setattr(bitpack, "_BLOCK_VALUES", 21)
    assert torch.equal(bitpack._by_rows(spy, x, 3), x * 2) and calls == [7]  # exactly fits: one call
    calls.clear()
    monkeypatch.setattr(bitpack, "_BLOCK_VALUES", 20)
    assert torch.equal(bitpack._by_rows(spy, x, 3), x * 2) and calls == [6, 1]
    monkeypatch.setattr(bitpack, "_BLOCK_VALUES", 4)  # every packer, one row per block, with odd widths
    values = torch.randint(0, 8, (5, 13), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert pack_int32(values, 3).tolist() == ref_pack(values.tolist(), 3)
    assert pack_dense_int32(values, 3).tolist() == ref_pack_dense(values.tolist(), 3)
    assert torch.equal(unpack_int32(pack_int32(values, 3), 3, 13), values)
    assert torch.equal(unpack_dense_int32(pack_dense_int32(values, 3), 3, 13), values)
    assert bitpack._BLOCK_VALUES == 4


def test_bitpack_errors() -> None:
    for pack in (pack_int32, pack_dense_int32):
        _raises(ValueError, "expected a 2-D tensor to pack, got shape (5,)", pack, torch.zeros(5), 4)
        for bits in (0, 9):
            _raises(ValueError, f"bits must be in 1..8, got {bits}", pack, torch.zeros(1, 5), bits)
        assert pack(torch.ones(1, 5), 1).shape == (1, 1) and pack(torch.ones(1, 5), 8).shape == (1, 2)
    _raises(ValueError, "order must be a permutation of 0..7, got [0, 1, 2, 3, 4, 5, 6, 6]", pack_int32,
            torch.zeros(1, 8), 4, [0, 1, 2, 3, 4, 5, 6, 6])
    _raises(ValueError, "order must be a permutation of 0..3, got [1, 2, 3, 4]", unpack_int32,
            torch.zeros(1, 1, dtype=torch.int32), 8, 4, (1, 2, 3, 4))
    for unpack in (unpack_int32, unpack_dense_int32):
        _raises(ValueError, "expected a 2-D int32 tensor to unpack, got torch.int64 (1, 5)", unpack,
                torch.zeros(1, 5, dtype=torch.int64), 4, 40)
        _raises(ValueError, "expected a 2-D int32 tensor to unpack, got torch.int32 (5,)", unpack,
                torch.zeros(5, dtype=torch.int32), 4, 40)
    words = torch.zeros(2, 5, dtype=torch.int32)
    for cols in (32, 41):  # 5 words of 8 values hold 33..40 columns
        _raises(ValueError, f"5 packed words of 8 values cannot hold exactly {cols} columns", unpack_int32, words, 4,
                cols)
    assert unpack_int32(words, 4, 33).shape == (2, 33) and unpack_int32(words, 4, 40).shape == (2, 40)
    for cols in (42, 54):  # 5 words of 3-bit values hold 43..53 values
        _raises(ValueError, f"5 packed words of 3-bit values cannot hold exactly {cols} columns", unpack_dense_int32,
                words, 3, cols)
    assert unpack_dense_int32(words, 3, 43).shape == (2, 43) and unpack_dense_int32(words, 3, 53).shape == (2, 53)


def test_nibbles_hand_computed() -> None:
    q = torch.tensor([[1, 2, 15, 0, 7, 9], [0, 15, 15, 15, 3, 12]], dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.dtype == torch.uint8 and packed.is_contiguous()
    assert packed.tolist() == [[0x21, 0x0F, 0x97], [0xF0, 0xFF, 0xC3]]
    back = unpack_nibbles(packed)
    assert back.dtype == torch.uint8 and torch.equal(back, q)
    assert unpack_nibbles(torch.tensor([[0xAB]], dtype=torch.uint8)).tolist() == [[0xB, 0xA]]
    rand = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(rand)), rand) and unpack_nibbles(pack_nibbles(rand)).shape == (5, 64)


def test_packers_stay_on_the_input_device() -> None:
    """Every intermediate is made on the input's device (here "meta": no data, shapes and dtypes only)."""
    values = torch.zeros(3, 13, dtype=torch.uint8, device="meta")
    for bits, order in ((3, None), (4, list(reversed(range(8))))):
        packed = pack_int32(values, bits, order)
        assert packed.device.type == "meta" and packed.dtype == torch.int32
        assert packed.shape == (3, word_count(13, bits))
        back = unpack_int32(packed, bits, 13, order)
        assert back.device.type == "meta" and back.dtype == torch.uint8 and back.shape == (3, 13)
    dense = pack_dense_int32(values, 3)
    assert dense.device.type == "meta" and dense.dtype == torch.int32 and dense.shape == (3, 2)
    back = unpack_dense_int32(dense, 3, 13)
    assert back.device.type == "meta" and back.dtype == torch.uint8 and back.shape == (3, 13)


def test_dense_packing_of_rows_longer_than_32_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """More than 32 blocks of 32 values per row (K > 1024, as in real layers), whole rows and one row per block."""
    values = torch.randint(0, 8, (3, 33 * 32 + 5), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    expect = ref_pack_dense(values.tolist(), 3)
    for block_values in (bitpack._BLOCK_VALUES, 3):  # 3: one row per block
        monkeypatch.setattr(bitpack, "_BLOCK_VALUES", block_values)
        packed = pack_dense_int32(values, 3)
        assert packed.tolist() == expect, block_values
        assert torch.equal(unpack_dense_int32(packed, 3, values.shape[1]), values), block_values
