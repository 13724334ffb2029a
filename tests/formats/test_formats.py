"""Bit-exact packing of the three on-disk formats, checked against independent reference packers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nvila_quant.errors import CheckpointError, ConfigError
from nvila_quant.formats import FORMATS, QTensor, check_packable, convert_linear, pack_linear, unpack_linear


def _qtensor(n: int, k: int, bits: int = 4, group_size: int = 128, symmetric: bool = False, bias: bool = True,
             scale_dtype: torch.dtype = torch.float16, seed: int = 0) -> QTensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen).to(scale_dtype) if bias else None
    return QTensor.from_float(w, bits, group_size, not symmetric, bias=b, scale_dtype=scale_dtype)


# ---------------------------------------------------------------------------------------------- reference packers
def _awq_reference_pack(intweight: np.ndarray) -> np.ndarray:
    """AutoAWQ's WQLinear_GEMM loop: intweight (K, N) -> (K, N/8) int32 words."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    out = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
    for col in range(out.shape[1]):
        for i in range(8):
            out[:, col] |= intweight[:, col * 8 + order_map[i]].astype(np.uint32) << (i * 4)
    return out.view(np.int32)


def _tinychat_reference_pack(q: np.ndarray) -> np.ndarray:
    """llm-awq's pack_intweight (interleave 4, kstride 64): q (N, K) -> (N/4, K) int16."""
    n, k = q.shape
    x = q.astype(np.int32).reshape(n, k // 32, 4, 4, 2).transpose(0, 1, 3, 2, 4).reshape(n, k // 32, 32)
    x = x.reshape(n, k // 32, 4, 4, 2).transpose(0, 1, 2, 4, 3).reshape(n, k)
    x = x.reshape(n // 4, 4, k // 64, 64).transpose(0, 2, 1, 3).reshape(n // 4, k // 64, 64, 4)
    x = x[..., 0] | (x[..., 1] << 4) | (x[..., 2] << 8) | (x[..., 3] << 12)
    return x.reshape(n // 4, k).astype(np.uint16).view(np.int16)


def _ct_reference_pack(values: np.ndarray, bits: int) -> np.ndarray:
    """compressed-tensors pack_to_int32 along dim 1 (values already unsigned): each row is one little-endian bit
    stream, value c at bits c*b .. c*b + b - 1, cut into ceil(C*b/32) words (no padding bits)."""
    rows, cols = values.shape
    n_words = -(-cols * bits // 32)
    words = np.zeros((rows, n_words), dtype=np.uint64)
    for c in range(cols):
        start = c * bits
        shifted = values[:, c].astype(np.uint64) << np.uint64(start % 32)  # may spill past bit 31
        words[:, start // 32] += shifted & np.uint64(0xFFFFFFFF)
        if start % 32 + bits > 32:
            words[:, start // 32 + 1] += shifted >> np.uint64(32)
    return words.astype(np.uint32).view(np.int32)


def test_autoawq_matches_reference_loop() -> None:
    qt = _qtensor(48, 256, group_size=64)
    t = pack_linear("autoawq", qt)
    assert np.array_equal(t["qweight"].numpy(), _awq_reference_pack(qt.q.t().numpy()))
    assert np.array_equal(t["qzeros"].numpy(), _awq_reference_pack(qt.zero.t().numpy()))
    assert t["scales"].shape == (4, 48) and t["scales"].dtype == torch.float16


def test_tinychat_matches_reference_pack_intweight() -> None:
    qt = _qtensor(16, 384, group_size=128)
    t = pack_linear("tinychat", qt)
    assert t["qweight"].dtype == torch.int16 and t["qweight"].shape == (4, 384)
    assert np.array_equal(t["qweight"].numpy(), _tinychat_reference_pack(qt.q.numpy()))
    assert t["scales"].shape == (8, 16)  # 3 groups padded to 8
    assert torch.equal(t["scales"][3:], torch.zeros(5, 16, dtype=torch.float16))
    sz = (-(qt.scale.float() * qt.zero.float())).half().t()
    assert torch.equal(t["scaled_zeros"][:3], sz)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_compressed_tensors_matches_reference(bits: int) -> None:
    qt = _qtensor(13, 48, bits=bits, group_size=16)  # N = 13: zero points need padding along dim 0
    t = pack_linear("compressed-tensors", qt)
    assert np.array_equal(t["weight_packed"].numpy(), _ct_reference_pack(qt.q.numpy(), bits))
    assert np.array_equal(t["weight_zero_point"].numpy(), _ct_reference_pack(qt.zero.t().numpy(), bits).T)
    assert t["weight_shape"].tolist() == [13, 48] and t["weight_shape"].dtype == torch.int64
    assert t["weight_scale"].shape == (13, 3)


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("src,dst", list(itertools.product(FORMATS, FORMATS)))
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_roundtrip_every_pair(src: str, dst: str, group_size: int) -> None:
    for i, (symmetric, bias, dtype) in enumerate(
        [(False, True, torch.float16), (True, False, torch.bfloat16), (False, False, torch.float32)]
    ):
        qt = _qtensor(32, 256, group_size=group_size, symmetric=symmetric, bias=bias, scale_dtype=dtype, seed=i)
        moved = convert_linear(pack_linear(src, qt), src, dst, 4, group_size, symmetric)
        back = unpack_linear(dst, moved, 4, group_size, symmetric)
        assert back.equal(qt), (src, dst, group_size, symmetric, bias, dtype)
        assert torch.equal(back.dequantize(torch.float32), qt.dequantize(torch.float32))


@pytest.mark.parametrize("bits,shape,group_size", [
    (4, (13, 24), 8), (4, (7, 40), -1), (2, (33, 96), 32), (3, (10, 30), 10), (5, (9, 18), 6), (8, (17, 64), 32),
])
def test_compressed_tensors_odd_shapes_and_widths(bits: int, shape: tuple[int, int], group_size: int) -> None:
    for symmetric in (False, True):
        qt = _qtensor(*shape, bits=bits, group_size=group_size, symmetric=symmetric, bias=not symmetric)
        back = unpack_linear("compressed-tensors", pack_linear("compressed-tensors", qt), bits, group_size, symmetric)
        assert back.equal(qt)


def test_autoawq_odd_group_sizes() -> None:
    for shape, g in [((8, 96), 96), ((24, 192), 64), ((40, 576), 192), ((16, 48), 16)]:
        qt = _qtensor(*shape, group_size=g)
        assert unpack_linear("autoawq", pack_linear("autoawq", qt), 4, g, False).equal(qt)


def test_tinychat_zero_points_exact_for_extreme_scales() -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        n, k = 8, 128
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        zero = torch.randint(0, 16, (n, 2), dtype=torch.int32)
        scale = torch.tensor([6e-8, 1e-7, 1e-5, 3e-4, 0.01, 0.7, 3.0, 1000.0]).repeat_interleave(2).reshape(n, 2)
        qt = QTensor(q, scale.to(dtype), zero, 4, 64)
        assert unpack_linear("tinychat", pack_linear("tinychat", qt), 4, 64, False).equal(qt), dtype


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("fmt,bits,group_size,shape,match", [
    ("autoawq", 8, 128, (64, 256), r"only \[4\]-bit weights, got bits=8"),
    ("tinychat", 3, 128, (64, 256), r"only \[4\]-bit weights, got bits=3"),
    ("compressed-tensors", 9, 128, (64, 256), r"got bits=9"),
    ("autoawq", 4, 128, (12, 256), r"multiple of 8, got 12"),
    ("autoawq", 4, 128, (64, 192), r"in_features=192, group_size=128"),
    ("tinychat", 4, 32, (64, 96), r"in_features % 64 == 0, got \(64, 96\)"),
    ("tinychat", 4, 64, (6, 128), r"out_features % 4 == 0"),
    ("compressed-tensors", 4, 0, (8, 64), r"got 0"),
    ("gptq", 4, 128, (64, 256), r"unknown quantized checkpoint format 'gptq'"),
])
def test_check_packable_errors(fmt: str, bits: int, group_size: int, shape: tuple[int, int], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_packable(fmt, bits, group_size, shape)


def test_unpack_errors_name_the_tensor() -> None:
    qt = _qtensor(32, 256)
    t = pack_linear("autoawq", qt)
    with pytest.raises(CheckpointError, match="lacks 'qzeros'"):
        unpack_linear("autoawq", {k: v for k, v in t.items() if k != "qzeros"}, 4, 128, False, "m")
    with pytest.raises(CheckpointError, match=r"m.scales .* has shape \(2, 32\), expected \(4, 32\)"):
        unpack_linear("autoawq", t, 4, 64, False, "m")
    with pytest.raises(CheckpointError, match="metadata says symmetric"):
        unpack_linear("autoawq", t, 4, 128, True, "m")
    ct = pack_linear("compressed-tensors", qt)
    ct["weight_packed"] = ct["weight_packed"][:, :-1]
    with pytest.raises(CheckpointError, match="weight_packed"):
        unpack_linear("compressed-tensors", ct, 4, 128, False, "m")
    tc = pack_linear("tinychat", qt)
    tc["scaled_zeros"] = tc["scaled_zeros"] + 0.3 * tc["scales"]
    with pytest.raises(CheckpointError, match="integer zero points"):
        unpack_linear("tinychat", tc, 4, 128, False, "m")
