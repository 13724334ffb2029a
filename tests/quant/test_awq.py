"""AWQ numerics against the reference formulas (llm-awq), written out independently here."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nvila_quant.errors import ConfigError
from nvila_quant.quant.awq import (
    QuantArgs,
    ScaledActivation,
    act_mean,
    apply_scales,
    clip_weight,
    compute_scales,
    reduce_to_rows,
    scale_quantize,
    search_clip,
    search_scales,
    skip_clip,
    weight_mean,
    wrap_scaled_activations,
)
from nvila_quant.quant.config import AWQConfig
from nvila_quant.quant.lazy import LLMBlocks, NVILAShell
from nvila_quant.quant.mappings import gqa_index, projector_groups, qwen2_block_groups


# ---------------------------------------------------------------------------------------------- reference
def ref_pseudo_quantize(w: torch.Tensor, n_bit: int, group: int, zero_point: bool = True) -> torch.Tensor:
    """llm-awq ``pseudo_quantize_tensor`` (asymmetric), and the symmetric formula of awq.md."""
    shape = w.shape
    w = w.reshape(-1, group if group > 0 else shape[-1])
    if zero_point:
        max_val, min_val = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
        max_int, min_int = 2**n_bit - 1, 0
        scales = (max_val - min_val).clamp(min=1e-5) / max_int
        zeros = (-torch.round(min_val / scales)).clamp_(min_int, max_int)
        w = (torch.clamp(torch.round(w / scales) + zeros, min_int, max_int) - zeros) * scales
    else:
        max_int, min_int = 2 ** (n_bit - 1) - 1, -(2 ** (n_bit - 1))
        scales = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / max_int
        w = torch.clamp(torch.round(w / scales), min_int, max_int) * scales
    return w.reshape(shape)


def ref_clip(w, input_feat, n_bit, group, n_grid=20, max_shrink=0.5, n_sample_token=512):
    """llm-awq ``auto_clip_layer`` (broadcast form, one output-channel batch)."""
    input_feat = input_feat.view(-1, input_feat.shape[-1])
    input_feat = input_feat.reshape(1, input_feat.shape[0], -1, group)
    input_feat = input_feat[:, 0 :: max(1, input_feat.shape[1] // n_sample_token)]
    w = w.reshape(w.shape[0], 1, -1, group)
    org_max_val = w.abs().amax(dim=-1, keepdim=True)
    best_max_val = org_max_val.clone()
    min_errs = torch.ones_like(org_max_val) * 1e9
    org_out = (input_feat * w).sum(dim=-1)
    for i_s in range(int(max_shrink * n_grid)):
        max_val = org_max_val * (1 - i_s / n_grid)
        cur_w = torch.clamp(w, -max_val, max_val)
        q_w = ref_pseudo_quantize(cur_w, n_bit, group)
        cur_out = (input_feat * q_w).sum(dim=-1)
        err = (cur_out - org_out).pow(2).mean(dim=1).view(min_errs.shape)
        better = err < min_errs
        min_errs[better] = err[better]
        best_max_val[better] = max_val[better]
    return best_max_val.squeeze(1).squeeze(-1)


@pytest.mark.parametrize("bits,group,zp",
                         [(4, 128, True), (3, 64, True), (8, 32, True), (4, -1, True), (4, 128, False)])
def test_quantizer_equals_reference_formula(bits, group, zp):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(bits)) * 0.1
    w[3, 7] = 4.0  # an outlier weight
    assert torch.equal(QuantArgs(bits, group, zp).fake(w), ref_pseudo_quantize(w, bits, group, zp))


def test_scales_and_grid_equal_reference():
    x_mean = torch.rand(32) * 3
    for ratio in (0.0, 0.35, 0.95):
        s = x_mean.pow(ratio).clamp(min=1e-4)
        assert torch.equal(compute_scales(x_mean, ratio), s / (s.max() * s.min()).sqrt())
    assert torch.equal(compute_scales(x_mean, 0.0), torch.ones(32))  # ratio 0 = plain RTN:
    w = torch.randn(16, 32) * 3
    for q in (QuantArgs(4, 16, True), QuantArgs(3, -1, False)):
        ones = compute_scales(x_mean, 0.0)
        assert torch.equal(scale_quantize(w, ones, q), ref_pseudo_quantize(w, q.bits, q.group_size, q.zero_point))
    w_mean = torch.rand(32)
    s = (x_mean.pow(0.3) / (w_mean.pow(0.7) + 1e-4)).clamp(min=1e-4)
    assert torch.allclose(compute_scales(x_mean, 0.3, w_mean), s / (s.max() * s.min()).sqrt())
    assert AWQConfig(numerics="reference").ratios == [i / 20 for i in range(20)]  # 0 .. 0.95, never 1.0
    assert AWQConfig(grid_include_one=True).ratios[-1] == 1.0


def test_statistics():
    xs = [torch.randn(1, 10, 8), torch.randn(2, 3, 8)]
    flat = torch.cat([x.reshape(-1, 8) for x in xs])
    assert torch.allclose(act_mean(xs), flat.abs().mean(0))
    w = torch.randn(6, 8)
    g = w.reshape(-1, 4).abs()
    assert torch.allclose(weight_mean([w[:2], w[2:]], 4), (g / g.amax(1, keepdim=True)).reshape(6, 8).mean(0))
    index = torch.tensor([0, 1, 0, 1])
    assert torch.allclose(reduce_to_rows(torch.tensor([1.0, 2.0, 3.0, 6.0]), index), torch.tensor([2.0, 4.0]))


def test_search_scales_keeps_first_minimum():
    x_mean = torch.rand(16) + 0.5
    target = {0.0: 3.0, 0.05: 2.0, 0.1: 1.0, 0.15: 1.0, 0.2: 5.0}
    calls = []

    def loss(cands):
        calls.append(cands)
        return list(target.values())[len(calls) - 1]

    w = torch.randn(4, 16)
    res = search_scales(loss, {"fc": w}, x_mean, QuantArgs(4, 16), list(target))
    assert res.ratio == 0.1 and res.losses == list(target.values())
    assert torch.equal(res.scales, compute_scales(x_mean, 0.1))
    s = compute_scales(x_mean, 0.0)
    assert torch.equal(calls[0]["fc"], QuantArgs(4, 16).fake(w * s) / s)


@pytest.mark.parametrize("group", [64, -1])
def test_clip_search_equals_reference_and_lowers_error(group):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen)
    w[:, 5] *= 8  # heavy columns make clipping worthwhile
    x = torch.randn(1500, 128, generator=gen)
    q = QuantArgs(4, group)
    ours = search_clip(w, x, q, oc_batch=24)  # batches do not change results
    ref = ref_clip(w, x, 4, group if group > 0 else 128)
    assert torch.equal(ours, ref)  # einsum vs broadcast-sum: same argmins here (only the sum order differs)
    clipped = clip_weight(w, ours)
    err_rtn = (x @ q.fake(w).T - x @ w.T).pow(2).mean()
    err_clip = (x @ q.fake(clipped).T - x @ w.T).pow(2).mean()
    assert err_clip < err_rtn
    assert skip_clip("self_attn.q_proj") and skip_clip("self_attn.k_proj") and not skip_clip("mlp.down_proj")


def test_gqa_index_matches_repeat_kv():
    heads, kv, hd = 4, 2, 3
    v_rows = torch.arange(kv * hd).float()  # one value per v_proj output row
    v = v_rows.view(1, kv, 1, hd)  # (B, kv, T, hd)
    repeated = v[:, :, None].expand(1, kv, heads // kv, 1, hd).reshape(1, heads, 1, hd)  # repeat_kv
    o_input = repeated.transpose(1, 2).reshape(-1)  # (heads * hd,) as o_proj sees it
    assert torch.equal(v_rows[gqa_index(heads, kv, hd)], o_input)


@pytest.fixture(scope="module")
def shell(tiny_nvila):
    return NVILAShell.load_pretrained(tiny_nvila, torch_dtype=torch.float32, device="cpu")


def test_scaling_leaves_block_output_unchanged(shell):
    """Every Qwen2 group (incl. the GQA v->o group) is function preserving in fp32 (1e-5)."""
    blocks = LLMBlocks(shell.config.subfolder("llm"), shell.block_class, shell.block_config)
    block = blocks.load(1, torch.float32, torch.device("cpu"))
    hidden, kwargs = shell.block_inputs(torch.randn(1, 40, 256, generator=torch.Generator().manual_seed(1)))
    ref = block(hidden, **kwargs)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    groups = qwen2_block_groups(block.self_attn.config, gqa_vo=True)
    assert [g.name for g in groups] == ["attn.qkv", "attn.vo", "mlp.gate_up", "mlp.down"]
    gen = torch.Generator().manual_seed(2)
    for g in groups:
        n = state[f"{g.prev_op}.weight"].shape[0]
        apply_scales(state, g, torch.rand(n, generator=gen) * 4 + 0.25)
    block.load_state_dict(state)
    out = block(hidden, **kwargs)
    assert not torch.equal(state["input_layernorm.weight"],
                           blocks.load(1, torch.float32, torch.device("cpu")).input_layernorm.weight)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (out - ref).abs().max()
    # the reference's rule: without --gqa-vo a GQA block has no v->o group
    assert "attn.vo" not in [g.name for g in qwen2_block_groups(block.self_attn.config)]


def test_projector_scaling_leaves_output_unchanged(tiny_nvila_lite):
    """LayerNorm -> Linear and GELU -> Linear (ScaledActivation) groups of the 3x3 projector."""
    import copy

    from nvila_quant.model import NVILAQwen2

    model = NVILAQwen2.load_pretrained(tiny_nvila_lite, torch_dtype=torch.float32, device="cpu")
    proj = copy.deepcopy(model.get_mm_projector())
    groups = projector_groups(proj)
    assert [(g.prev_op, g.prev_kind, g.linears) for g in groups] == [
        ("layers.1", "norm", ("layers.2",)), ("layers.4", "norm", ("layers.5",)), ("layers.6", "act", ("layers.7",))
    ]
    x = torch.randn(2, 1024, proj.mm_hidden_size)
    ref = proj(x)
    wrap_scaled_activations(proj, ["layers.6"])
    assert isinstance(proj.layers[6], ScaledActivation)
    state = {k: v.clone() for k, v in proj.state_dict().items()}
    gen = torch.Generator().manual_seed(3)
    for g in groups:
        n = proj.get_submodule(g.linears[0]).in_features
        apply_scales(state, g, torch.rand(n, generator=gen) * 4 + 0.25)
    proj.load_state_dict(state)
    assert torch.allclose(proj(x), ref, atol=1e-5, rtol=1e-4)


def test_config_validation_names_expected_and_got():
    with pytest.raises(ConfigError, match=r"bits must be one of \(2, 3, 4, 8\), got 5"):
        AWQConfig(bits=5)
    with pytest.raises(ConfigError, match="group_size must be one of"):
        AWQConfig(group_size=100)
    with pytest.raises(ConfigError, match="targets"):
        AWQConfig(targets="llm,vision")
    with pytest.raises(ConfigError, match="text_ratio must be in"):
        AWQConfig(text_ratio=1.5)
    with pytest.raises(ConfigError, match="format must be one of"):
        AWQConfig(format="gguf")
    assert AWQConfig(targets="projector").targets == ("projector",)
    assert AWQConfig.from_dict(AWQConfig(bits=8).to_dict()) == AWQConfig(bits=8)


def test_scaled_activation_is_act_over_scales():
    act = ScaledActivation(nn.GELU(), 4)
    act.scales.data = torch.tensor([1.0, 2.0, 4.0, 0.5])
    x = torch.randn(3, 4)
    assert torch.allclose(act(x), nn.functional.gelu(x) / act.scales)


# ---------------------------------------------------------------------------------------------- hand-computed oracles
def _raises_exactly(exc: type[BaseException], message: str, fn, *args) -> None:
    with pytest.raises(exc) as info:
        fn(*args)
    assert info.value.args == (message,)


def test_act_mean_hand_computed_dtype_and_device():
    """mean |x| over every token: (2 + 3 tokens of 2 channels); float32 whatever the default dtype; input's device."""
    xs = [torch.tensor([[1.0, -2.0], [3.0, 0.0]], dtype=torch.float64), torch.tensor([[[-5.0, 4.0]], [[0.0, 0.0]],
                                                                                     [[1.0, 1.0]]])]
    assert torch.equal(act_mean(xs), torch.tensor([2.0, 1.4]))
    assert torch.equal(act_mean([torch.tensor([[-3.0, 6.0, 1.0]])]), torch.tensor([3.0, 6.0, 1.0]))  # one token
    assert torch.equal(act_mean([torch.ones(5, 2)]), torch.ones(2))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert act_mean([torch.ones(3, 2, dtype=torch.float64)]).dtype == torch.float32
    finally:
        torch.set_default_dtype(default)
    assert act_mean([torch.ones(3, 4, device="meta")]).device.type == "meta"


def test_weight_mean_hand_computed():
    w = torch.tensor([[1.0, -2.0, 4.0, 0.0], [0.5, 0.5, -1.0, 3.0]])
    # groups of 2 normalised by their absmax: [0.5, 1 | 1, 0], [1, 1 | 1/3, 1]
    assert torch.equal(weight_mean([w], 2), torch.tensor([0.75, 1.0, 2 / 3, 0.5]))
    # one group per row (-1): [0.25, 0.5, 1, 0], [1/6, 1/6, 1/3, 1]
    assert torch.allclose(weight_mean([w[:1], w[1:]], -1), torch.tensor([5 / 24, 1 / 3, 2 / 3, 0.5]), atol=0, rtol=1e-6)
    small = torch.tensor([[1e-3, -2e-3]])
    assert torch.equal(weight_mean([small], 2), torch.tensor([0.5, 1.0]))  # scale free
    assert torch.equal(weight_mean([torch.zeros(2, 2)], 2), torch.zeros(2))  # an all-zero group stays 0
    assert weight_mean([w.half()], 2).dtype == torch.float32


def test_reduce_to_rows_hand_computed():
    stat = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    assert reduce_to_rows(stat, None) is stat
    index = torch.tensor([0, 2, 0, 2])
    out = reduce_to_rows(stat, index)
    assert out.dtype == torch.float64 and out.tolist() == [2.5, 0.0, 5.0]  # row 1 feeds no column: 0
    assert reduce_to_rows(stat, index, n_rows=5).tolist() == [2.5, 0.0, 5.0, 0.0, 0.0]
    assert reduce_to_rows(stat, torch.tensor([1, 0, 0, 0])).tolist() == [14 / 3, 1.0]  # a single column: itself
    assert reduce_to_rows(torch.ones(4, device="meta"), index, n_rows=3).device.type == "meta"


def test_compute_scales_clamps_and_duo_formula():
    x_mean = torch.tensor([0.0, 1.0, 4.0, 16.0])
    s = compute_scales(x_mean, 0.5)  # sqrt: [0 -> 1e-4, 1, 2, 4], over sqrt(4 * 1e-4) = 0.02
    assert torch.equal(s, torch.tensor([1e-4, 1.0, 2.0, 4.0]).clamp(min=1e-4) / torch.tensor(4 * 1e-4).sqrt())
    assert torch.allclose(s, torch.tensor([0.005, 50.0, 100.0, 200.0]), rtol=1e-6, atol=0)
    w_mean = torch.tensor([1.0, 0.25, 0.0, 4.0])
    for ratio in (0.0, 0.25, 1.0):
        d = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        assert torch.equal(compute_scales(x_mean, ratio, w_mean), d / (d.max() * d.min()).sqrt()), ratio
    # ratio 1: w_mean^0 = 1, s = x / (1 + 1e-4), and the normalisation cancels the constant
    assert torch.allclose(compute_scales(x_mean.clamp(min=1), 1.0, w_mean), torch.tensor([0.25, 0.25, 1.0, 4.0]),
                          rtol=1e-6, atol=0)
    s = compute_scales(torch.tensor([1.0, 100.0]), 1.0, torch.tensor([1.0, 1.0]))  # max * min normalised to 1
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0)) and torch.allclose(s, torch.tensor([0.1, 10.0]))
    assert compute_scales(torch.ones(4, device="meta"), 0.5, torch.ones(4, device="meta")).device.type == "meta"


def test_scale_quantize_is_q_of_w_times_s_over_s():
    from nvila_quant.numerics.quantizer import pseudo_quantize

    gen = torch.Generator().manual_seed(5)
    w = torch.randn(8, 32, generator=gen)
    s = torch.rand(32, generator=gen) * 4 + 0.25
    q = QuantArgs(4, 16, True)
    assert torch.equal(scale_quantize(w, s, q), ref_pseudo_quantize(w * s, 4, 16) / s)
    wb = w.bfloat16()
    out = scale_quantize(wb, s, QuantArgs(3, -1, False))
    assert out.dtype == torch.bfloat16
    sb = s.bfloat16()
    assert torch.equal(out, pseudo_quantize(wb * sb, 3, -1, False) / sb)
    assert QuantArgs() == QuantArgs(4, 128, True)


def test_search_scales_per_linear_quantizers_index_duo_and_progress():
    """q as a mapping (None: the linear stays float), a GQA index, duo scaling, the progress callback, ratios."""
    gen = torch.Generator().manual_seed(6)
    x_mean, w_mean = torch.rand(4, generator=gen) + 0.5, torch.rand(8, generator=gen) + 0.1
    index = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    weights = {"a": torch.randn(4, 8, generator=gen), "b": torch.randn(2, 8, generator=gen)}
    seen, ticks = [], []
    losses = [3.0, 1.0, 2.0]

    def loss_fn(cands):
        seen.append(cands)
        return losses[len(seen) - 1]

    ratios = (0.0, 0.5, 0.9)
    res = search_scales(loss_fn, weights, x_mean, {"a": QuantArgs(4, 4), "b": None}, ratios, reduce_to_rows(
        w_mean, index), index, progress=lambda: ticks.append(1))
    assert len(ticks) == 3 and res.ratios == [0.0, 0.5, 0.9] and res.losses == losses and res.ratio == 0.5
    s = compute_scales(x_mean, 0.5, reduce_to_rows(w_mean, index))
    assert torch.equal(res.scales, s) and res.scales.dtype == torch.float32 and res.best_loss == 1.0
    assert torch.equal(seen[1]["a"], ref_pseudo_quantize(weights["a"] * s[index], 4, 4) / s[index])
    assert all(c["b"] is weights["b"] for c in seen)  # no quantizer: the float weight itself


def test_search_scales_failures_name_the_losses():
    w = {"fc": torch.randn(2, 4)}
    losses = iter([float("nan"), float("inf")])
    _raises_exactly(FloatingPointError, "scale search found no finite loss (losses: [nan, inf])", search_scales,
                    lambda c: next(losses), w, torch.ones(4), QuantArgs(4, -1), [0.0, 0.5])
    _raises_exactly(FloatingPointError, "scale search produced NaN scales", search_scales, lambda c: 1.0, w,
                    torch.tensor([1.0, float("nan"), 2.0, 3.0]), QuantArgs(4, -1), [0.5])


def test_clip_weight_hand_computed():
    w = torch.tensor([[-5.0, -1.0, 2.0, 6.0], [0.5, -0.5, -9.0, 9.0]])
    mv = torch.tensor([[3.0, 4.0], [1.0, 8.5]])
    assert torch.equal(clip_weight(w, mv), torch.tensor([[-3.0, -1.0, 2.0, 4.0], [0.5, -0.5, -8.5, 8.5]]))
    out = clip_weight(w.bfloat16(), mv)
    assert out.dtype == torch.bfloat16 and torch.equal(out, clip_weight(w, mv).bfloat16())
    assert torch.equal(clip_weight(w, torch.tensor([[2.0], [1.0]])), torch.tensor([[-2.0, -1.0, 2.0, 2.0],
                                                                                   [0.5, -0.5, -1.0, 1.0]]))


def test_apply_clip_replaces_the_weight():
    from nvila_quant.quant.awq import apply_clip

    state = {"fc.weight": torch.tensor([[-5.0, 1.0, 2.0, 6.0]]).bfloat16(), "other.weight": torch.ones(1)}
    apply_clip(state, "fc", torch.tensor([[3.0, 4.0]]))
    assert state["fc.weight"].dtype == torch.bfloat16
    assert state["fc.weight"].tolist() == [[-3.0, 1.0, 2.0, 4.0]] and state["other.weight"].tolist() == [1.0]


def test_apply_scales_every_prev_kind_hand_computed():
    from nvila_quant.quant.mappings import ScaleGroup

    s = torch.tensor([2.0, 4.0])
    state = {"p.norm.weight": torch.tensor([1.0, 8.0]), "p.norm.bias": torch.tensor([2.0, -4.0]),
             "p.fc.weight": torch.tensor([[1.0, 1.0], [3.0, 5.0]], dtype=torch.bfloat16),
             "p.up.weight": torch.tensor([[2.0, 4.0], [6.0, 8.0]]), "p.up.bias": torch.tensor([8.0, 8.0]),
             "p.down.weight": torch.tensor([[1.0, 1.0]]), "p.act.scales": torch.tensor([1.0, 0.5]),
             "p.out.weight": torch.tensor([[1.0, 2.0]])}
    apply_scales(state, ScaleGroup("n", "norm", "norm", ("fc",), "fc"), s, prefix="p.")
    assert state["p.norm.weight"].tolist() == [0.5, 2.0] and state["p.norm.bias"].tolist() == [1.0, -1.0]
    assert state["p.fc.weight"].dtype == torch.bfloat16 and state["p.fc.weight"].tolist() == [[2.0, 4.0], [6.0, 20.0]]
    apply_scales(state, ScaleGroup("l", "up", "linear", ("down",), "down"), s, prefix="p.")
    assert state["p.up.weight"].tolist() == [[1.0, 2.0], [1.5, 2.0]] and state["p.up.bias"].tolist() == [4.0, 2.0]
    assert state["p.down.weight"].tolist() == [[2.0, 4.0]]
    apply_scales(state, ScaleGroup("a", "act", "act", ("out",), "out"), s, prefix="p.")
    assert state["p.act.scales"].tolist() == [2.0, 2.0] and state["p.out.weight"].tolist() == [[2.0, 8.0]]
    no_bias = {"norm.weight": torch.ones(2), "fc.weight": torch.ones(1, 2), "up.weight": torch.ones(2, 2),
               "down.weight": torch.ones(1, 2)}
    apply_scales(no_bias, ScaleGroup("n", "norm", "norm", ("fc",), "fc"), s)
    apply_scales(no_bias, ScaleGroup("l", "up", "linear", ("down",), "down"), s)
    assert set(no_bias) == {"norm.weight", "fc.weight", "up.weight", "down.weight"}
    assert no_bias["norm.weight"].tolist() == [0.5, 0.25]
    assert no_bias["up.weight"].tolist() == [[0.5, 0.5], [0.25, 0.25]]
    _raises_exactly(KeyError, "p.act.scales missing: wrap the activation with wrap_scaled_activations first",
                    apply_scales, {}, ScaleGroup("a", "act", "act", ("out",), "out"), s, "p.")
    _raises_exactly(ValueError, "unknown prev_kind 'conv'", apply_scales, {"c.weight": torch.ones(2)},
                    ScaleGroup("c", "c", "conv", ("o",), "o"), s)


def test_apply_scales_gqa_columns_follow_the_index():
    from nvila_quant.quant.mappings import ScaleGroup

    group = ScaleGroup("attn.vo", "v", "linear", ("o",), "o", kv_heads=1, heads=2, head_dim=2)
    assert group.index().tolist() == [0, 1, 0, 1]
    state = {"v.weight": torch.ones(2, 3), "v.bias": torch.ones(2), "o.weight": torch.ones(1, 4)}
    apply_scales(state, group, torch.tensor([2.0, 4.0]))
    assert state["v.weight"].tolist() == [[0.5] * 3, [0.25] * 3] and state["v.bias"].tolist() == [0.5, 0.25]
    assert state["o.weight"].tolist() == [[2.0, 4.0, 2.0, 4.0]]


@pytest.mark.cuda
def test_apply_scales_and_clip_keep_each_tensor_on_its_device():
    """Scales on the GPU, the state on the CPU (the runner's layout): arithmetic where the scales are, results back
    on each tensor's own device and dtype."""
    from nvila_quant.quant.awq import apply_clip
    from nvila_quant.quant.mappings import ScaleGroup

    s = torch.tensor([2.0, 4.0], device="cuda")
    state = {"n.weight": torch.tensor([1.0, 8.0], dtype=torch.bfloat16), "fc.weight": torch.ones(1, 2)}
    apply_scales(state, ScaleGroup("n", "n", "norm", ("fc",), "fc"), s)
    assert all(t.device.type == "cpu" for t in state.values()) and state["n.weight"].dtype == torch.bfloat16
    assert state["n.weight"].tolist() == [0.5, 2.0] and state["fc.weight"].tolist() == [[2.0, 4.0]]
    apply_clip(state, "fc", torch.tensor([[3.0]], device="cuda"))
    assert state["fc.weight"].device.type == "cpu" and state["fc.weight"].tolist() == [[2.0, 3.0]]
