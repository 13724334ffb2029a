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
    assert AWQConfig().ratios == [i / 20 for i in range(20)]  # 0 .. 0.95, never 1.0
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
