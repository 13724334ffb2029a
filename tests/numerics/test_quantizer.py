"""The quantizer and QTensor against hand-computed values, a per-group reference loop and exact error messages."""

from __future__ import annotations

import pytest
import torch

from nvila_quant.numerics import QTensor, compute_qparams, dequantize, group_count, pseudo_quantize, quantize


def _raises(exc: type[BaseException], message: str, fn, *args, **kwargs) -> None:
    """``fn(*args)`` raises ``exc`` whose message is exactly ``message``."""
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    assert str(info.value) == message


def ref_quantize(w: torch.Tensor, bits: int, group: int, zero_point: bool):
    """One group at a time, the formula of quantizer.py's docstring (llm-awq pseudo_quantize_tensor)."""
    n, k = w.shape
    g = k if group == -1 else group
    q = torch.empty(n, k, dtype=torch.uint8)
    scales = torch.empty(n, k // g)
    zeros = torch.empty(n, k // g, dtype=torch.int32)
    for r in range(n):
        for j in range(k // g):
            x = w[r, j * g : (j + 1) * g].float()
            if zero_point:
                qmax = 2**bits - 1
                s = torch.clamp(x.max() - x.min(), min=1e-5) / qmax
                z = torch.clamp(-torch.round(x.min() / s), 0, qmax)
                v = torch.clamp(torch.round(x / s) + z, 0, qmax)
            else:
                qmax = 2 ** (bits - 1) - 1
                s = torch.clamp(x.abs().max(), min=1e-5) / qmax
                z = torch.tensor(float(2 ** (bits - 1)))
                v = torch.clamp(torch.round(x / s), -(qmax + 1), qmax) + z
            q[r, j * g : (j + 1) * g] = v.to(torch.uint8)
            scales[r, j], zeros[r, j] = s, int(z)
    return q, scales, zeros


def test_group_count() -> None:
    assert group_count(256, -1) == 1 and group_count(256, 64) == 4 and group_count(100, 32) == 3
    assert type(group_count(256, 64)) is int


def test_hand_computed_asymmetric_groups() -> None:
    """4 bits, groups of 16: scale = (max - min) / 15, zero = clamp(-round(min / s), 0, 15), q clamped to 0..15."""
    ramp = torch.arange(16.0)
    w = torch.stack([
        torch.cat([ramp, ramp - 8]),  # s 1, z 0 | s 1, z 8
        torch.cat([ramp + 15, ramp - 30]),  # all positive: z clamps to 0, q to 15 | all negative: z 15 (not 30), q 0
        torch.cat([torch.full((16,), 3.0), ramp * 0.5]),  # constant: s = 1e-5 / 15 | s 0.5, z 0
    ])
    q, scale, zero = quantize(w, 4, 16)
    assert scale.dtype == torch.float32 and zero.dtype == torch.int32 and q.dtype == torch.uint8
    assert torch.equal(scale, torch.tensor([[1.0, 1.0], [1.0, 1.0], [1e-5 / 15, 0.5]]))
    assert zero.tolist() == [[0, 8], [0, 15], [0, 0]]
    assert torch.equal(compute_qparams(w, 4, 16)[0], scale) and torch.equal(compute_qparams(w, 4, 16)[1], zero)
    r = list(range(16))
    assert q.tolist() == [r + r, [15] * 16 + [0] * 16, [15] * 16 + r]
    assert torch.equal(dequantize(q, scale, zero, 16)[1], torch.tensor([15.0] * 16 + [-15.0] * 16))


def test_hand_computed_symmetric_and_other_widths() -> None:
    """Symmetric: s = absmax / (2^(b-1) - 1), q = round(w / s) (half to even) + 2^(b-1); widths 3 and 8."""
    w = torch.tensor([[-7.0, -3.5, -2.5, 0.0, 0.5, 1.5, 7.0, 2.49]])
    q, scale, zero = quantize(w, 4, 8, zero_point=False)
    assert q.tolist() == [[1, 4, 6, 8, 8, 10, 15, 10]] and scale.tolist() == [[1.0]] and zero.tolist() == [[8]]
    assert compute_qparams(w, 3, -1, False)[1].tolist() == [[4]]
    assert torch.equal(compute_qparams(w, 3, -1, False)[0], torch.tensor([[7.0 / 3]]))
    x = torch.arange(8.0).reshape(1, 8)  # 3 bits asymmetric: s = 7 / 7
    assert quantize(x, 3, -1)[0].tolist() == [list(range(8))] and quantize(x, 3, -1)[1].tolist() == [[1.0]]
    y = torch.arange(256.0).reshape(1, 256) - 100  # 8 bits: s = 255 / 255, z = 100
    q8, s8, z8 = quantize(y, 8, -1)
    assert torch.equal(q8, torch.arange(256, dtype=torch.uint8).reshape(1, 256))
    assert s8.tolist() == [[1.0]] and z8.tolist() == [[100]]
    assert torch.equal(pseudo_quantize(y, 8, -1), y)  # the integer grid reproduces integers


@pytest.mark.parametrize("bits,group,zp", [(4, 16, True), (3, 32, True), (8, -1, True), (4, 16, False),
                                           (2, -1, False), (8, 32, False)])
def test_quantize_equals_per_group_reference(bits: int, group: int, zp: bool) -> None:
    gen = torch.Generator().manual_seed(bits * 7 + group)
    w = torch.randn(6, 64, generator=gen)
    w[0, :16] += 3.0  # a one-signed group
    w[1, 16:32] = -w[1, 16:32].abs() - 1
    w[2, :16] = 0.25  # a constant group
    q, scale, zero = quantize(w, bits, group, zp)
    rq, rs, rz = ref_quantize(w, bits, group, zp)
    assert torch.equal(q, rq) and torch.equal(scale, rs) and torch.equal(zero, rz)
    deq = dequantize(q, scale, zero, group)
    g = 64 if group == -1 else group
    expect = ((rq.float().reshape(-1, g) - rz.float().reshape(-1, 1)) * rs.reshape(-1, 1)).reshape(6, 64)
    assert torch.equal(deq, expect) and torch.equal(pseudo_quantize(w, bits, group, zp), expect)


def test_defaults_are_4_bit_groups_of_128_asymmetric() -> None:
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    for a, b in zip(compute_qparams(w), compute_qparams(w, 4, 128, True), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(quantize(w), quantize(w, 4, 128, True), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(pseudo_quantize(w), pseudo_quantize(w, 4, 128, True))
    assert QTensor.from_float(w).equal(QTensor.from_float(w, 4, 128, True))
    qt = QTensor.from_float(w)
    assert (qt.bits, qt.group_size, qt.symmetric, qt.scale.shape) == (4, 128, False, (4, 2))


def test_dtypes_follow_the_inputs() -> None:
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    scale, zero = compute_qparams(w, 4, 32)
    assert scale.dtype == torch.float32 and zero.dtype == torch.int32 and scale.shape == zero.shape == (4, 2)
    pq = pseudo_quantize(w, 4, 32)
    assert pq.dtype == torch.bfloat16
    assert torch.equal(pq, pseudo_quantize(w.float(), 4, 32).to(torch.bfloat16))
    q = torch.tensor([[0, 15, 8, 1]], dtype=torch.uint8)
    out = dequantize(q, torch.tensor([[0.5]], dtype=torch.bfloat16), torch.tensor([[8]], dtype=torch.int32), -1)
    assert out.dtype == torch.bfloat16 and out.tolist() == [[-4.0, 3.5, 0.0, -3.5]]
    out = dequantize(q, torch.tensor([[1.0, 0.25]]), torch.tensor([[0, 15]], dtype=torch.int32), 2)
    assert out.tolist() == [[0.0, 15.0, -1.75, -3.5]]


def test_quantizer_errors() -> None:
    _raises(ValueError, "expected a 2-D weight (out_features, in_features), got shape (16,)", quantize,
            torch.zeros(16), 4, 16)
    _raises(ValueError, "expected a 2-D weight (out_features, in_features), got shape (1, 2, 8)",
            compute_qparams, torch.zeros(1, 2, 8), 4, 8)
    for g in (0, -2, 5, 32):
        _raises(ValueError, f"group_size must divide in_features (got in_features=16, group_size={g})", quantize,
                torch.zeros(2, 16), 4, g)
    q, scale, zero = quantize(torch.arange(4.0).reshape(1, 4), 4, 1)  # groups of one value are allowed
    assert q.shape == (1, 4) and scale.shape == zero.shape == (1, 4)


# ---------------------------------------------------------------------------------------------- QTensor
def _qt(**kw) -> QTensor:
    args = dict(q=torch.zeros(2, 64, dtype=torch.uint8), scale=torch.ones(2, 4),
                zero=torch.zeros(2, 4, dtype=torch.int32), bits=4, group_size=16)
    args.update(kw)
    return QTensor(**args)


def test_qtensor_validation_messages() -> None:
    _raises(ValueError, "q must be (out_features, in_features), got shape (64,)", _qt, q=torch.zeros(64))
    for g in (-2, 48):
        _raises(ValueError, f"group_size must divide in_features (got in_features=64, group_size={g})", _qt,
                group_size=g)
    _raises(ValueError, "scale must have shape (2, 4) for q (2, 64), got (2, 3)", _qt, scale=torch.ones(2, 3))
    _raises(ValueError, "zero must have shape (2, 4) for q (2, 64), got (4, 2)", _qt, zero=torch.zeros(4, 2))
    _raises(ValueError, "bias must have shape (2,), got (3,)", _qt, bias=torch.zeros(3))
    for bits in (0, 9):
        _raises(ValueError, f"bits must be in 1..8, got {bits}", _qt, bits=bits)
    for bits in (1, 8):
        assert _qt(bits=bits).bits == bits
    assert _qt(group_size=1, scale=torch.ones(2, 64), zero=torch.zeros(2, 64)).effective_group_size == 1
    per_channel = _qt(group_size=-1, scale=torch.ones(2, 1), zero=torch.zeros(2, 1), bias=torch.zeros(2))
    assert (per_channel.out_features, per_channel.in_features, per_channel.effective_group_size) == (2, 64, 64)


def test_qtensor_from_float_dequantize_to_and_equal() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 64, generator=gen).to(torch.bfloat16)
    bias = torch.randn(4, generator=gen)
    qt = QTensor.from_float(w, 4, 32, False, bias=bias)
    q, scale, zero = quantize(w, 4, 32, False)
    assert torch.equal(qt.q, q) and torch.equal(qt.zero, zero) and qt.symmetric and qt.bias is bias
    assert qt.scale.dtype == torch.bfloat16 and torch.equal(qt.scale, scale.to(torch.bfloat16))  # the weight's dtype
    assert QTensor.from_float(w, 4, 32, scale_dtype=torch.float16).scale.dtype == torch.float16
    assert not QTensor.from_float(w, 4, 32, True).symmetric
    assert qt.dequantize().dtype == torch.bfloat16
    assert qt.dequantize(torch.float32).dtype == torch.float32  # torch.equal ignores dtypes: checked apart
    assert torch.equal(qt.dequantize(torch.float32), dequantize(qt.q, qt.scale, qt.zero, 32).float())
    moved = qt.to("meta")
    assert all(t.device.type == "meta" for t in (moved.q, moved.scale, moved.zero, moved.bias))
    assert (moved.bits, moved.group_size, moved.symmetric, moved.scale.dtype) == (4, 32, True, torch.bfloat16)
    assert QTensor.from_float(w, 4, 32).to("meta").bias is None

    same = QTensor(qt.q.clone(), qt.scale.clone(), qt.zero.clone(), 4, 32, True, bias.clone())
    assert qt.equal(same) and same.equal(qt)
    no_bias = QTensor(qt.q, qt.scale, qt.zero, 4, 32, True)
    assert no_bias.equal(QTensor(qt.q, qt.scale, qt.zero, 4, 32, True))
    q2 = qt.q.clone()
    q2[0, 0] ^= 1
    z2 = qt.zero.clone()
    z2[0, 0] += 1
    s2 = qt.scale.clone()
    s2[0, 0] *= 2
    different = [
        QTensor(qt.q, qt.scale, qt.zero, 5, 32, True, bias),
        QTensor(qt.q, qt.scale[:, :1].repeat(1, 1), qt.zero[:, :1], 4, -1, True, bias),
        QTensor(qt.q, qt.scale, qt.zero, 4, 32, False, bias),
        QTensor(q2, qt.scale, qt.zero, 4, 32, True, bias),
        QTensor(qt.q, qt.scale, z2, 4, 32, True, bias),
        QTensor(qt.q, s2, qt.zero, 4, 32, True, bias),
        QTensor(qt.q, qt.scale.float(), qt.zero, 4, 32, True, bias),  # same values, another dtype
        QTensor(qt.q, qt.scale, qt.zero, 4, 32, True, bias + 1),
        no_bias,
    ]
    for i, other in enumerate(different):
        assert not qt.equal(other) and not other.equal(qt), i


def test_qtensor_group_size_zero_and_equal_compares_dtypes() -> None:
    q = torch.zeros(2, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="group_size must divide in_features \\(got in_features=4, group_size=0\\)"):
        QTensor(q, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int32), 4, 0)
    a = QTensor(q, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int32), 4, -1)
    assert a.equal(QTensor(q.clone(), torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int32), 4, -1))
    assert not a.equal(QTensor(q, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int64), 4, -1))  # same values
    assert not a.equal(QTensor(q.to(torch.int32), torch.ones(2, 1), a.zero, 4, -1))
    assert not a.equal(QTensor(q, torch.ones(2, 1), a.zero, 4, -1, bias=torch.zeros(2)))
