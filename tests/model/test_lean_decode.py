"""The lean decode step (model/lean_decode.py) and its native ops (kernels/cpu/step.py): the same logits as the
eager transformers step to within its dtype's rounding, the same greedy text in every mode, the cache handed back
for the next chat turn, and clear refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb

from nvila_quant.errors import DecodeError
from nvila_quant.kernels.cpu.step import step_ops
from nvila_quant.model import NVILAQwen2
from nvila_quant.model.generation import ChatSession
from nvila_quant.model.lean_decode import LeanDecoder, lean_refusal
from nvila_quant.model.llm import cache_kwarg, make_cache
from nvila_quant.model.static_decode import decode_settings
from nvila_quant.quant.rtn import write_rtn_checkpoint

GREEDY = GenerationConfig(do_sample=False, max_new_tokens=8)
OPS = step_ops()
needs_native = pytest.mark.skipif(OPS is None, reason="the native CPU library is not available")


def _with_cache(llm: torch.nn.Module, ids: torch.Tensor, cache) -> torch.Tensor:
    return llm(input_ids=ids, use_cache=True, **{cache_kwarg(type(llm)): cache}).logits[:, -1]


def _within_ulps(got: torch.Tensor, want: torch.Tensor, ulps: float) -> bool:
    """|got - want| <= ulps units in the last place of want (in want's dtype), elementwise."""
    eps = torch.finfo(want.dtype).eps
    ulp = torch.ldexp(torch.full(want.shape, eps), torch.frexp(want.float()).exponent - 1)
    return bool(((got.float() - want.float()).abs() <= ulps * ulp).all())


@pytest.fixture(scope="module")
def int4_bf16(tiny_nvila, tmp_path_factory) -> NVILAQwen2:
    """The tiny NVILA RTN-quantized, g64 (the T16 kernels on CPU, q / k / v and gate / up grouped), with bf16
    activations."""
    dst = write_rtn_checkpoint(tiny_nvila, tmp_path_factory.mktemp("lean") / "int4", "autoawq", bits=4, group_size=64)
    return NVILAQwen2.load_pretrained(dst, torch_dtype=torch.bfloat16, device="cpu")


@pytest.mark.parametrize("native", [True, False], ids=["native-ops", "torch-ops"])
@pytest.mark.parametrize("which", ["fp32-float", "bf16-int4"])
def test_lean_steps_follow_the_eager_step_and_store_back(which, native, tiny_model, int4_bf16) -> None:
    if native and OPS is None:
        pytest.skip("the native CPU library is not available")
    model = tiny_model if which == "fp32-float" else int4_bf16
    llm = model.get_llm()
    with torch.inference_mode():
        dyn = make_cache(llm)
        ids = torch.arange(5, 19)[None]
        logits = _with_cache(llm, ids, dyn)
        n = dyn.get_seq_length()
        decoder = LeanDecoder(llm, 64, None)
        if not native:
            decoder.ops = None
        assert (decoder.ops is not None) == native
        decoder.load(dyn)
        for keys in decoder.keys:  # junk past the prefix must never be read
            keys[:, n:] = float("nan")
        token = logits.argmax(-1, keepdim=True)
        dtype = logits.dtype
        for _ in range(8):
            want = _with_cache(llm, token, dyn)
            got = decoder.step(token)
            # the two reductions add in another order: a few roundings of the logits' dtype apart
            tol = 16 * torch.finfo(dtype).eps * want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=0, atol=tol)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
            token = want.argmax(-1, keepdim=True)
        back = make_cache(llm)
        _with_cache(llm, ids, back)
        decoder.store(back)
        assert back.get_seq_length() == dyn.get_seq_length() == n + 8
        for mine, theirs in zip(back.layers, dyn.layers, strict=True):
            assert mine.keys.dtype == theirs.keys.dtype
            for got, want in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                tol = 16 * torch.finfo(dtype).eps * want.abs().max().item()
                torch.testing.assert_close(got, want, rtol=0, atol=tol)
        decoder.keys[0].fill_(0)  # the stored cache is a copy
        assert back.layers[0].keys.abs().sum() > 0
        with pytest.raises(ValueError, match="do not fit a cache of 16"):
            LeanDecoder(llm, 16, None).load(back)
        with pytest.raises(ValueError, match="holds no positions"):
            LeanDecoder(llm, 16, None).load(make_cache(llm))


def test_generation_is_the_same_text_in_every_cpu_mode(int4_bf16, images, monkeypatch) -> None:
    """Greedy text and chat turns (the cache handed back between turns) are the same with the lean step (what "auto"
    runs on CPU), the static cache and the dynamic loop."""
    prompt = [images["cat"], "What is shown?"]
    texts = {}
    for mode in ("dynamic", "static", "lean", "auto"):
        monkeypatch.setattr(decode_settings(), "mode", mode)
        int4_bf16.decode_session.static = None
        session = ChatSession(int4_bf16)
        texts[mode] = (int4_bf16.generate_content(prompt, GREEDY),
                       session.send(prompt, GREEDY), session.send("And then?", GREEDY))
        kind = type(int4_bf16.decode_session.static).__name__
        assert kind == {"dynamic": "NoneType", "static": "StaticDecoder"}.get(mode, "LeanDecoder")
    assert texts["lean"] == texts["auto"] == texts["static"] == texts["dynamic"]
    session = int4_bf16.decode_session
    assert session.mask.shape[1] == session.cache.get_seq_length()


def test_mode_switches_do_not_grow_the_cache(tiny_model, monkeypatch) -> None:
    """A decoder of another kind starts at the size asked for (only the same kind grows geometrically)."""
    session = tiny_model.decode_session
    ids = torch.ones(1, 4, dtype=torch.bool)
    sizes = []
    for mode in ("static", "lean", "static", "lean"):
        monkeypatch.setattr(decode_settings(), "mode", mode)
        embeds = tiny_model.get_llm().get_input_embeddings()(torch.arange(4)[None])
        session.extend(embeds, ids, 0)
        with session.decoding(2) as step:
            step(torch.tensor([[1]]))
        sizes.append(session.static.max_len)
    assert sizes == [256] * 4


def test_refusals(tiny_model, monkeypatch) -> None:
    llm = tiny_model.get_llm()
    assert lean_refusal(llm) is None
    monkeypatch.setattr(llm.config, "hidden_act", "gelu")
    assert lean_refusal(llm) == "hidden_act 'gelu'"
    with pytest.raises(ValueError, match="the lean decode step does not apply: hidden_act 'gelu'"):
        LeanDecoder(llm, 32, None)
    session = tiny_model.decode_session
    session.static = None
    session.extend(llm.get_input_embeddings()(torch.arange(4)[None]), torch.ones(1, 4, dtype=torch.bool), 0)
    monkeypatch.setattr(decode_settings(), "mode", "auto")  # falls back to the dynamic cache
    with session.decoding(2) as step:
        step(torch.tensor([[1]]))
    assert session.static is None and session.length == 5
    monkeypatch.setattr(decode_settings(), "mode", "lean")  # asked for by name: an error naming why
    with (pytest.raises(DecodeError, match="NVILA_QUANT_DECODE=lean does not apply to this model: hidden_act 'gelu'"),
          session.decoding(2)):
        pass


# ---- the native ops against the transformers ops they replace --------------------------------------------------------

@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rmsnorm_is_qwen2s(dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 1, 1536, generator=gen) * 3).to(dtype)
    d = torch.randn(1, 1, 1536, generator=gen).to(dtype)
    norm = Qwen2RMSNorm(1536, eps=1e-6).to(dtype)
    norm.weight.data = (torch.rand(1536, generator=gen) + 0.5).to(dtype)
    want_x = x + d
    want = norm(want_x)
    got_x, got = x.clone(), torch.empty_like(x)
    OPS.add_rmsnorm(got_x, d, norm.weight, got, 1e-6)
    assert torch.equal(got_x, want_x)  # the residual add: elementwise, bitwise
    # the mean of squares adds in another order: one rounding of the normalised x (times a weight in [0.5, 1.5]), then
    # the product's
    assert _within_ulps(got, want, 3)
    if dtype == torch.bfloat16:
        assert (got == want).float().mean() > 0.98


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_cache_write_are_bitwise(dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    hq, hkv, d, pos = 12, 2, 128, 7
    q = torch.randn(1, 1, hq * d, generator=gen).to(dtype)
    k = torch.randn(1, 1, hkv * d, generator=gen).to(dtype)
    v = torch.randn(1, 1, hkv * d, generator=gen).to(dtype)
    ang = torch.randn(d // 2, generator=gen)
    cos, sin = torch.cat([ang.cos()] * 2).to(dtype), torch.cat([ang.sin()] * 2).to(dtype)
    want_q, want_k = apply_rotary_pos_emb(q.view(1, 1, hq, d).transpose(1, 2), k.view(1, 1, hkv, d).transpose(1, 2),
                                          cos[None, None], sin[None, None])
    keys, values = torch.zeros(hkv, 16, d), torch.zeros(hkv, 16, d)
    OPS.rope_kv(q, k, v, cos, sin, keys, values, pos)
    assert torch.equal(q.view(hq, d), want_q[0, :, 0])
    assert torch.equal(k.view(hkv, d), want_k[0, :, 0])
    assert torch.equal(keys[:, pos], want_k[0, :, 0].float()) and torch.equal(values[:, pos], v.view(hkv, d).float())
    assert keys[:, :pos].abs().sum() == 0 and keys[:, pos + 1:].abs().sum() == 0


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 37, 300])
def test_attention_is_sdpa_with_gqa(dtype, length) -> None:
    gen = torch.Generator().manual_seed(length)
    hq, hkv, d, max_len = 12, 2, 128, 320
    q = torch.randn(1, 1, hq * d, generator=gen).to(dtype)
    keys = torch.randn(hkv, max_len, d, generator=gen).to(dtype).float()
    values = torch.randn(hkv, max_len, d, generator=gen).to(dtype).float()
    keys[:, length:] = float("nan")  # past the length: never read
    out, scratch = torch.empty(1, 1, hq * d, dtype=dtype), torch.empty(max_len)
    OPS.attend(q, keys, values, length, d**-0.5, out, scratch)
    want = F.scaled_dot_product_attention(q.view(1, hq, 1, d).double(), keys[None, :, :length].double(),
                                          values[None, :, :length].double(), enable_gqa=True)
    want = want.view(1, 1, hq * d)
    assert torch.isfinite(out).all()
    # fp32 sums, one rounding at the end
    tol = (4 * torch.finfo(dtype).eps + 1e-5) * want.abs().max().item()
    torch.testing.assert_close(out.double(), want, rtol=0, atol=tol)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_is_qwen2s(dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    g = (torch.randn(1, 1, 8960, generator=gen) * 4).to(dtype)
    u = torch.randn(1, 1, 8960, generator=gen).to(dtype)
    want = F.silu(g) * u
    got = torch.empty_like(g)
    OPS.silu_mul(g, u, got)
    # libm's expf vs torch's vectorised exp: a rounding or two of silu(g), then the product's
    assert _within_ulps(got, want, 4)


@needs_native
def test_linear_groups_are_the_layers_own_calls(int4_bf16) -> None:
    """q / k / v and gate / up in one native call give bitwise what each layer's own call gives (bias included), and
    the lean step of the int4 bf16 model takes the groups."""
    from nvila_quant.kernels.cpu.step import LinearGroup

    llm = int4_bf16.get_llm()
    decoder = LeanDecoder(llm, 32, None)
    assert all(qkv is not None and gate_up is not None for qkv, gate_up in decoder.groups)
    layer = llm.model.layers[0]
    x = torch.randn(1, 1, llm.config.hidden_size).bfloat16()
    mods = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
    got = LinearGroup.of(OPS, [m.native_kernel(torch.bfloat16) for m in mods])(x)
    for m, out in zip(mods, got, strict=True):
        assert torch.equal(out, m(x))
    assert LinearGroup.of(OPS, [None]) is None  # a layer without a native kernel: no group
    with pytest.raises(ValueError, match="output buffer does not match"):
        LinearGroup.of(OPS, [mods[0].native_kernel(torch.bfloat16)], [torch.empty(1, 1, 3, dtype=torch.bfloat16)])
