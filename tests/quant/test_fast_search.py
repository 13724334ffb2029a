"""The fast numerics (the default preset): the coarse-to-fine ratio search, the Gram-matrix loss, the token subset,
bf16 compute where the CPU has it, and the presets themselves; the reference preset stays llm-awq's arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
from awq_helpers import TEST_CONFIG

from nvila_quant.formats.checkpoint import read_quantized_submodel
from nvila_quant.machine import cpu_has_bf16
from nvila_quant.model import NVILAQwen2
from nvila_quant.numerics.qtensor import QTensor
from nvila_quant.quant.awq import (
    COARSE_STEP,
    QuantArgs,
    coarse_indices,
    compute_scales,
    gram,
    gram_mse,
    grid_search,
    sample_tokens,
    scale_quantize,
    search_evaluations,
    search_scales,
)
from nvila_quant.quant.block import _group_calls
from nvila_quant.quant.config import PRESETS, AWQConfig, resolve_dtype
from nvila_quant.quant.mappings import ScaleGroup
from nvila_quant.quant.results import apply_awq_results
from nvila_quant.quant.runner import quantize

FAST = {k: v for k, v in TEST_CONFIG.items() if k != "numerics"}


# ---------------------------------------------------------------------------------------------- presets
def test_presets_fill_unset_settings_and_flags_override():
    fast, ref = AWQConfig(), AWQConfig(numerics="reference")
    assert fast.numerics == "fast" and {k: getattr(fast, k) for k in PRESETS["fast"]} == PRESETS["fast"]
    assert {k: getattr(ref, k) for k in PRESETS["reference"]} == PRESETS["reference"] and ref.is_reference
    assert fast.ratios == [i / 20 for i in range(21)] and ref.ratios == [i / 20 for i in range(20)]
    mixed = AWQConfig(numerics="reference", duo_scaling=True, search_tokens=128)
    assert mixed.duo_scaling and mixed.search_tokens == 128 and not mixed.gqa_vo and not mixed.is_reference
    # a reference run fingerprints as before the presets (old work folders resume); any other names its settings
    assert not {"numerics", "ratio_search", "search_tokens", "gram_loss"} & set(ref.search_fingerprint())
    assert {"numerics", "ratio_search", "search_tokens", "gram_loss"} <= set(fast.search_fingerprint())
    # settings written before the presets existed read back as what they were: the reference's
    old = {k: v for k, v in ref.to_dict().items() if k not in ("numerics", "ratio_search", "search_tokens",
                                                                  "gram_loss")}
    assert AWQConfig.from_dict(old) == ref
    assert AWQConfig.from_dict(fast.to_dict()) == fast
    with pytest.raises(Exception, match="numerics must be one of"):
        AWQConfig(numerics="quick")
    with pytest.raises(Exception, match="ratio_search must be one of"):
        AWQConfig(ratio_search="golden")
    with pytest.raises(Exception, match="search_tokens must be >= 0"):
        AWQConfig(search_tokens=-1)


def test_compute_dtype_per_preset_and_device():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, "reference") == torch.float32
    assert resolve_dtype("auto", cpu, "fast") == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert resolve_dtype("auto", torch.device("cuda"), "fast") == torch.float16
    assert resolve_dtype("float32", cpu, "fast") == torch.float32


# ---------------------------------------------------------------------------------------------- coarse-to-fine
@pytest.mark.parametrize("n", [20, 21, 9, 5])
def test_coarse_search_finds_the_grid_minimum_of_unimodal_losses(n):
    ratios = [i / 20 for i in range(n)]
    x_mean = torch.rand(16) + 0.5
    for best in range(n):
        for curve in (lambda r, b=best: (r - ratios[b]) ** 2, lambda r, b=best: abs(r - ratios[b]) ** 0.5):
            seen: list[float] = []

            def loss(s: torch.Tensor, curve=curve, seen=seen) -> float:
                r = next(r for r in ratios if torch.equal(compute_scales(x_mean, r), s))
                seen.append(r)
                return curve(r)

            ticks = []
            res = grid_search(loss, x_mean, ratios, progress=lambda ticks=ticks: ticks.append(1),
                              coarse_step=COARSE_STEP)
            assert res.ratio == ratios[best] and torch.equal(res.scales, compute_scales(x_mean, ratios[best]))
            assert len(seen) == len(set(seen)) == len(ticks) <= search_evaluations(n, COARSE_STEP)
            assert len(seen) < n or n < 10
            assert [i for i, ok in enumerate(res.evaluated) if ok] == sorted(ratios.index(r) for r in seen)
            assert all((x is None) != ok for x, ok in zip(res.logged_losses, res.evaluated, strict=True))
            assert res.best_loss == min(x for x in res.logged_losses if x is not None)
    assert coarse_indices(21, 4) == [0, 4, 8, 12, 16, 20] and coarse_indices(20, 4) == [0, 4, 8, 12, 16, 19]
    assert search_evaluations(21, 4) == 12 and search_evaluations(21, 1) == 21


def test_coarse_search_ties_and_nan_keep_the_first_minimum():
    ratios = [i / 20 for i in range(21)]
    x_mean = torch.rand(8) + 0.5
    flat = grid_search(lambda s: 1.0, x_mean, ratios, coarse_step=COARSE_STEP)
    assert flat.ratio == 0.0  # the first of equal losses, as the grid's strict <
    losses = iter([math.nan, 3.0, 2.0, 2.0, 5.0, 6.0] + [9.0] * 20)
    res = grid_search(lambda s: next(losses), x_mean, ratios, coarse_step=COARSE_STEP)
    assert res.ratio == ratios[8] and res.best_loss == 2.0


def _outlier_layer(k: int, n: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random real-shaped linear and its inputs with a few salient outlier channels (as activations have)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:8]] *= 20
    w = torch.randn(n, k, generator=g) / k**0.5
    return x, w


@pytest.mark.parametrize("k,n,seed", [(1536, 192, 0), (1536, 192, 1), (896, 256, 2), (256, 640, 3)])
def test_coarse_search_matches_the_exhaustive_grid_on_real_shaped_layers(k, n, seed):
    x, w = _outlier_layer(k, n, 512, seed)
    q = QuantArgs(4, 128)
    ref = x @ w.T

    def loss(c: dict[str, torch.Tensor]) -> float:
        return float((x @ c["w"].T - ref).pow(2).mean())

    ratios = [i / 20 for i in range(21)]
    x_mean = x.abs().mean(0)
    for w_mean in (None, w.abs().mean(0)):
        grid = search_scales(loss, {"w": w}, x_mean, q, ratios, w_mean)
        coarse = search_scales(loss, {"w": w}, x_mean, q, ratios, w_mean, coarse_step=COARSE_STEP)
        assert coarse.ratio == grid.ratio or coarse.best_loss <= 1.02 * grid.best_loss, (grid.losses, coarse.losses)
        assert sum(coarse.evaluated) < len(ratios)


# ---------------------------------------------------------------------------------------------- Gram loss
def test_gram_mse_equals_the_output_mse():
    x, w = _outlier_layer(384, 96, 700, 5)
    xs = [x[:300].reshape(3, 100, 384), x[300:]]  # samples of any shape
    g, tokens = gram(xs, chunk=128)
    assert tokens == 700 and torch.allclose(g, x.T @ x, rtol=1e-4, atol=1e-2)
    s = compute_scales(x.abs().mean(0), 0.5)
    cand = scale_quantize(w, s, QuantArgs(4, 128))
    direct = float((x @ cand.T - x @ w.T).pow(2).mean())
    assert gram_mse(cand - w, g, tokens) == pytest.approx(direct, rel=1e-4)


# ---------------------------------------------------------------------------------------------- token subset
class _Rec:
    def __init__(self, calls):
        self.calls = {"m": calls}


def test_search_tokens_subsets_are_seeded_and_within_budget():
    xs = [torch.randn(1, n, 8) for n in (50, 70, 30, 90)]
    calls = [((x,), {}) for x in xs]
    wise = ScaleGroup("g", "p", "norm", ("m",), "m", token_wise=True)
    chunks = _group_calls(wise, _Rec(calls), chunk_tokens=16, search_tokens=100, seed=3)
    picked = torch.cat([c[0][0] for c in chunks])
    assert picked.shape == (100, 8) and all(c[0][0].shape[0] <= 16 for c in chunks)
    assert torch.equal(picked, sample_tokens(xs, 100, 3))  # every token's row is a real row, in order
    again = torch.cat([c[0][0] for c in _group_calls(wise, _Rec(calls), 16, 100, seed=3)])
    assert torch.equal(picked, again)
    assert torch.cat([c[0][0] for c in _group_calls(wise, _Rec(calls), 1000, 0)]).shape == (240, 8)  # 0 = all
    # a module that mixes tokens (attention) gets whole samples, a seeded choice, in order, within the budget
    whole = ScaleGroup("g", "p", "norm", ("m",), "m", token_wise=False)
    kept = _group_calls(whole, _Rec(calls), 16, 130, seed=3)
    assert 0 < sum(c[0][0].shape[1] for c in kept) <= 130
    order = [next(i for i, x in enumerate(xs) if x is c[0][0]) for c in kept]
    assert order == sorted(order) and len(order) > 1
    assert _group_calls(whole, _Rec(calls), 16, 10, seed=3)  # at least one sample, even over the budget
    assert _group_calls(whole, _Rec(calls), 16, 0) == calls


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def fast_awq(tmp_path_factory, tiny_nvila):
    out = tmp_path_factory.mktemp("fast") / "q"
    return quantize(tiny_nvila, AWQConfig(**FAST, search_tokens=512), "builtin", out, progress=False)


def test_fast_defaults_end_to_end(fast_awq, tiny_nvila):
    log = fast_awq.log
    assert log["settings"]["numerics"] == "fast" and log["settings"]["search_tokens"] == 512
    assert log["compute_dtype"] == str(resolve_dtype("auto", torch.device("cpu"), "fast"))
    for block in log["blocks"]:
        assert block["mse_awq"] < block["mse_rtn"], block["index"]
        groups = {g["name"]: g for g in block["groups"]}
        assert list(groups) == ["attn.qkv", "attn.vo", "mlp.gate_up", "mlp.down"]
        # o_proj reads 256 features < 512 search tokens: the Gram form over every token; down_proj's 640 are not
        assert groups["attn.vo"]["loss"] == "gram" and groups["attn.vo"]["search_tokens"] > 512
        assert groups["mlp.down"]["loss"] == "forward" and groups["mlp.gate_up"]["search_tokens"] == 512
        for g in groups.values():
            done = [x for x in g["losses"] if x is not None]
            assert len(g["losses"]) == 21 and len(done) <= search_evaluations(21, COARSE_STEP) < 21
            assert g["awq_loss"] == min(done) < g["rtn_loss"], (block["index"], g["name"])
    # re-applying awq_results to the float model (in the compute dtype) and rounding gives every packed weight
    dtype = getattr(torch, log["compute_dtype"].removeprefix("torch."))
    model = NVILAQwen2.load_pretrained(tiny_nvila, torch_dtype=dtype, device="cpu")
    apply_awq_results(model, fast_awq.output / "awq_results.safetensors")
    _, qlinears, _ = read_quantized_submodel(fast_awq.output / "llm")
    for name, qt in qlinears.items():
        lin = model.get_submodule("llm." + name)
        again = QTensor.from_float(lin.weight.float(), qt.bits, qt.group_size, not qt.symmetric,
                                   bias=None if lin.bias is None else lin.bias.to(qt.scale.dtype),
                                   scale_dtype=qt.scale.dtype)
        assert again.equal(qt), name


def test_coarse_search_keeps_the_grid_choice_on_the_tiny_outlier_model(tmp_path, tiny_nvila):
    """Same settings but the ratio search: every group's coarse choice is the grid's, or within 2% of its loss."""
    same = dict(FAST, targets="llm", n_samples=2, quant_input=False, search_tokens=0)
    runs = {r: quantize(tiny_nvila, AWQConfig(**same, ratio_search=r), "builtin", tmp_path / r, progress=False).log
            for r in ("grid", "coarse")}
    for bg, bc in zip(runs["grid"]["blocks"], runs["coarse"]["blocks"], strict=True):
        for gg, gc in zip(bg["groups"], bc["groups"], strict=True):
            assert gc["ratio"] == gg["ratio"] or gc["awq_loss"] <= 1.02 * gg["awq_loss"], (bg["index"], gg["name"])
            done = [(a, b) for a, b in zip(gg["losses"], gc["losses"], strict=True) if b is not None]
            assert all(a == pytest.approx(b, rel=1e-6) for a, b in done)  # the same losses where evaluated
