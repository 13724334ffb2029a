"""The tensor-core CUDA kernels (w4a16_mma.cu) run on CPU threads through cuda_sim.h: their indexing, K splits,
token tails and numerics are checked here without a GPU (the GPU run of the same source: test_cuda.py)."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from nvila_quant.formats import QTensor
from nvila_quant.kernels.cuda.dispatch import CudaWeights, mma_reason, prepare_cuda
from nvila_quant.kernels.cuda.layout import mma_layout_reason, mma_pack, mma_unpack
from nvila_quant.kernels.cuda.native import mma_dequant_into, mma_launch
from nvila_quant.kernels.linear import QuantLinear
from nvila_quant.numerics.nibbles import pack_nibbles, unpack_nibbles

needs_cxx = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")


def _sim():  # noqa: ANN202
    from nvila_quant.kernels.cuda.sim import sim_library

    return sim_library()


def _layer(n: int, k: int, group: int, gen: torch.Generator) -> tuple[CudaWeights, torch.Tensor]:
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    zero = torch.randint(0, 16, (n, k // group), dtype=torch.uint8, generator=gen)
    scale = torch.rand(n, k // group, generator=gen) * 0.02 + 1e-3
    w = ((q.view(n, k // group, group).float() - zero[..., None].float()) * scale[..., None]).reshape(n, k)
    return prepare_cuda(mma_pack(pack_nibbles(q)), scale, zero, group, k, "mma"), w


def test_mma_layout_round_trip_and_element_order() -> None:
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (96, 320), dtype=torch.uint8, generator=gen)
    packed = mma_pack(pack_nibbles(q))
    assert packed.shape == (96, 160) and torch.equal(unpack_nibbles(mma_unpack(packed)), q)
    words = packed.view(torch.int32).view(3, 10, 32, 4)  # (N/32, K/32, lane, word)
    rng = random.Random(0)
    for _ in range(200):  # the documented order: word 2 nt + j of lane 4 g + t, nibble p0 + 2 p1 + 4 h
        b, c, lane, word, nib = (rng.randrange(3), rng.randrange(10), rng.randrange(32), rng.randrange(4),
                                 rng.randrange(8))
        g, t = divmod(lane, 4)
        nt, j = divmod(word, 2)
        p0, p1, h = nib & 1, (nib >> 1) & 1, nib >> 2
        got = (int(words[b, c, lane, word]) >> (4 * nib)) & 15
        assert got == int(q[32 * b + 16 * nt + 8 * p0 + g, 32 * c + 8 * t + 4 * j + 2 * p1 + h])
    with pytest.raises(ValueError, match="multiples of 32"):
        mma_pack(torch.zeros(40, 64, dtype=torch.uint8))


def test_mma_layout_reasons() -> None:
    assert mma_layout_reason(4, 64, 256, 128) is None
    assert "N=40" in mma_layout_reason(4, 40, 256, 128)
    assert "group=48" in mma_layout_reason(4, 64, 96, 48)
    assert mma_layout_reason(8, 64, 256, 128) == "bits=8"
    assert mma_reason(4, 64, 256, 128, torch.full((64, 2), 16, dtype=torch.uint8)) == "zero points above 15"


@needs_cxx
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_simulated_mma_kernels_match_reference(dtype: torch.dtype) -> None:
    lib, gen, rng = _sim(), torch.Generator().manual_seed(2), random.Random(3)
    cases = [(32, 32, 32, 1, 1, 8), (64, 256, 64, 3, 1, 16), (96, 512, 128, 11, 3, 8), (32, 256, 256, 40, 2, 8),
             (64, 384, 32, 17, 1, 8), (32, 1024, 1024, 8, 4, 16), (64, 320, 64, 70, 2, 8), (32, 96, 32, 16, 3, 16)]
    for n, k, group, m, ksplit, warps in cases:
        cw, w = _layer(n, k, group, gen)
        assert torch.equal(mma_dequant_into(lib, cw.qweight, cw.scales, cw.zeros, group,
                                            torch.empty(n, k, dtype=dtype)),
                           w.to(dtype))
        bias = torch.randn(n, generator=gen).to(dtype) if rng.random() < 0.5 else None
        x = torch.randn(m, k, generator=gen).to(dtype)
        ref = x.float() @ w.T + (0 if bias is None else bias.float())
        out = torch.full((m, n), float("nan"), dtype=dtype)  # unwritten elements stay NaN
        mma_launch(lib, x, cw.qweight, cw.scales, cw.zeros, bias, group, out, ksplit, warps=warps)
        # fp32 sums of exact (q - z) x products, scaled per group in fp32: within one rounding of the output
        tol = (2e-3 if dtype == torch.float16 else 1.6e-2) * ref.abs().max().item()
        assert not out.isnan().any() and (out.float() - ref).abs().max().item() <= tol, (n, k, group, m, ksplit)


@needs_cxx
@pytest.mark.parametrize("deferred", [False, True], ids=["copies-land-at-issue", "copies-land-at-wait"])
def test_simulated_tiled_gemm_matches_reference(deferred: bool) -> None:
    """The 128 x 128-tile GEMM with its cp.async pipeline: partial row tiles (N = 96, 160), token tails, K splits,
    group sizes; copies landing early catch a stage refilled while read, landing late a missing wait."""
    from nvila_quant.kernels.cuda.sim import set_cp_async_mode

    lib, gen = _sim(), torch.Generator().manual_seed(5)
    set_cp_async_mode(deferred)
    try:
        for n, k, group, m, ksplit, dtype in [(128, 256, 64, 40, 1, torch.float16),
                                              (96, 256, 128, 130, 2, torch.bfloat16),
                                              (160, 320, 32, 7, 1, torch.float16),
                                              (32, 512, 512, 129, 3, torch.bfloat16)]:
            cw, w = _layer(n, k, group, gen)
            x = torch.randn(m, k, generator=gen).to(dtype)
            bias = torch.randn(n, generator=gen).to(dtype)
            ref = x.float() @ w.T + bias.float()
            out = torch.full((m, n), float("nan"), dtype=dtype)
            mma_launch(lib, x, cw.qweight, cw.scales, cw.zeros, bias, group, out, ksplit, tiled=True)
            tol = (2e-3 if dtype == torch.float16 else 1.6e-2) * ref.abs().max().item()
            assert not out.isnan().any() and (out.float() - ref).abs().max().item() <= tol, (n, k, group, m, ksplit)
    finally:
        set_cp_async_mode(False)


@needs_cxx
def test_simulated_mma_kernel_refuses_bad_arguments() -> None:
    lib, gen = _sim(), torch.Generator().manual_seed(4)
    cw, _ = _layer(64, 256, 64, gen)
    x, out = torch.randn(2, 256).half(), torch.empty(2, 64).half()
    with pytest.raises(RuntimeError, match="warps must be 8 or 16"):
        mma_launch(lib, x, cw.qweight, cw.scales, cw.zeros, None, 64, out, 1, warps=4)
    with pytest.raises(RuntimeError, match=r"ksplit must lie in \[1, K / 32\], got 9"):
        mma_launch(lib, x, cw.qweight, cw.scales, cw.zeros, None, 64, out, 9)
    with pytest.raises(RuntimeError, match="need N % 32 == 0"):  # the library's own check (Python's skipped)
        mma_launch(lib, x, cw.qweight[:40], cw.scales[:, :40], cw.zeros[:, :40], None, 64, out[:, :40].contiguous(), 1,
                   weights_checked=True)
    with pytest.raises(RuntimeError, match=r"w4a16_mma_gemm failed: ksplit must lie"):
        mma_launch(lib, x, cw.qweight, cw.scales, cw.zeros, None, 64, out, 9, tiled=True)
    with pytest.raises(ValueError, match="x has K=128"):
        mma_launch(lib, x[:, :128].contiguous(), cw.qweight, cw.scales, cw.zeros, None, 64, out, 1)
    with pytest.raises(ValueError, match="scales must be a contiguous"):
        mma_launch(lib, x, cw.qweight, cw.scales.t().contiguous(), cw.zeros, None, 64, out, 1)
    with pytest.raises(ValueError, match="the mma layout does not take this layer"):
        prepare_cuda(torch.zeros(40, 128, dtype=torch.uint8), torch.ones(40, 4), torch.zeros(40, 4, dtype=torch.uint8),
                     64, 256, "mma")


def test_quant_linear_mma_layout_is_invisible_outside_the_kernels() -> None:
    """Prepared for CUDA (here on CPU tensors), q takes the mma layout; state dicts, qtensor(), dequantized weights
    and copies see nibble rows, and a device move (or a CPU call) goes back to rows."""
    qt = QTensor.from_float(torch.randn(64, 256), 4, 64, True, bias=torch.randn(64), scale_dtype=torch.bfloat16)
    mod = QuantLinear.from_qtensor(qt)
    rows, w = mod.q.clone(), mod.dequantize_weight(torch.float32)
    mod.prepare("cuda")
    assert mod.q_layout == "mma" and not torch.equal(mod.q, rows)
    assert mod._prepared["cuda"].layout == "mma" and mod._prepared["cuda"].scales.shape == (4, 64)
    assert torch.equal(mod.state_dict()["q"], rows) and torch.equal(mod.qtensor().q, qt.q)
    assert torch.equal(mod.dequantize_weight(torch.float32), w)
    import copy

    assert torch.equal(copy.deepcopy(mod).q, rows)
    mod.float()  # _apply: back to rows
    assert mod.q_layout == "rows" and torch.equal(mod.q, rows)
    odd = QuantLinear.from_qtensor(QTensor.from_float(torch.randn(40, 256), 4, 64, True))
    odd.prepare("cuda")
    assert odd.q_layout == "rows" and odd._prepared["cuda"].layout == "rows"
