"""Static-cache decode (model/static_decode.py): the eager static steps equal the dynamic-cache loop on CPU; on a
GPU the same steps replay one captured CUDA graph and give the same text."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from nvila_quant.errors import ConfigError, DecodeError
from nvila_quant.model import NVILAQwen2
from nvila_quant.model.generation import ChatSession
from nvila_quant.model.llm import cache_kwarg, make_cache
from nvila_quant.model.static_decode import BUCKET, StaticDecoder, decode_settings
from nvila_quant.model.tokenizer import tokenize_conversation

GREEDY = GenerationConfig(do_sample=False, max_new_tokens=8)


def _with_cache(llm: torch.nn.Module, ids: torch.Tensor, cache) -> torch.Tensor:
    """Next-token logits (1, V) of ``ids`` on ``cache`` (the argument's name differs across transformers 5.x)."""
    return llm(input_ids=ids, use_cache=True, **{cache_kwarg(type(llm)): cache}).logits[:, -1]


def test_static_steps_equal_dynamic_cache_and_store_back(tiny_model) -> None:
    ids = tokenize_conversation([{"from": "human", "value": "Tell me a story."}], tiny_model.tokenizer,
                                add_generation_prompt=True)[None]
    llm = tiny_model.get_llm()
    with torch.inference_mode():
        dyn = make_cache(llm)
        logits = _with_cache(llm, ids, dyn)
        n = dyn.get_seq_length()
        decoder = StaticDecoder(llm, 64, graph=False)
        decoder.load(dyn)
        for layer in decoder.cache.layers:  # junk past the prefix (as capture warm-up leaves it) must stay masked
            layer.keys[:, :, n:] = 1e3
            layer.values[:, :, n:] = -1e3
        token = logits.argmax(-1, keepdim=True)
        for _ in range(6):
            want = _with_cache(llm, token, dyn)
            got = decoder.step(token)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            token = want.argmax(-1, keepdim=True)
        back = make_cache(llm)
        _with_cache(llm, ids, back)
        decoder.store(back)
        assert back.get_seq_length() == dyn.get_seq_length() == n + 6
        torch.testing.assert_close(back.layers[0].keys, dyn.layers[0].keys, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="do not fit a static cache of 16"):
            StaticDecoder(llm, 16, graph=False).load(back)
        with pytest.raises(ValueError, match="holds no positions"):
            StaticDecoder(llm, 16, graph=False).load(make_cache(llm))


def test_generation_with_static_decode_matches_dynamic(tiny_model, images, monkeypatch) -> None:
    prompt = [images["cat"], "What is shown?"]
    monkeypatch.setattr(decode_settings(), "mode", "dynamic")
    text = tiny_model.generate_content(prompt, GREEDY)
    session = ChatSession(tiny_model)
    turns = [session.send(prompt, GREEDY), session.send("And then?", GREEDY)]
    monkeypatch.setattr(decode_settings(), "mode", "static")
    assert tiny_model.generate_content(prompt, GREEDY) == text
    decoder = tiny_model.decode_session.static
    assert decoder is not None and decoder.max_len % BUCKET == 0
    session = ChatSession(tiny_model)
    assert [session.send(prompt, GREEDY), session.send("And then?", GREEDY)] == turns  # the cache went back
    assert tiny_model.decode_session.mask.shape[1] == tiny_model.decode_session.cache.get_seq_length()
    assert tiny_model.benchmark([images["cat"], "Describe."], max_new_tokens=4, quiet=True)["decode_tokens"] == 3
    with pytest.raises(ConfigError, match="NVILA_QUANT_DECODE must be one of auto, lean, graph, compiled"):
        decode_settings().mode = "bogus"
    monkeypatch.setenv("NVILA_QUANT_DECODE", "bogus")  # the variable itself, read when the settings are first used
    with pytest.raises(ConfigError, match="NVILA_QUANT_DECODE must be one of auto, lean, graph, compiled, static, "
                       "dynamic, got 'bogus'"):
        decode_settings.reload()
    monkeypatch.delenv("NVILA_QUANT_DECODE")
    decode_settings.reload()


@pytest.mark.cuda
def test_cuda_graph_decode_matches_eager(tiny_nvila, images, monkeypatch) -> None:
    model = NVILAQwen2.load_pretrained(tiny_nvila, torch_dtype=torch.float16, device="cuda")
    prompt = [images["cat"], "What is shown?"]
    monkeypatch.setattr(decode_settings(), "mode", "dynamic")
    text = model.generate_content(prompt, GREEDY)
    monkeypatch.setattr(decode_settings(), "mode", "graph")
    assert model.generate_content(prompt, GREEDY) == text
    assert model.decode_session.static.graph is not None  # captured, not the eager fallback
    monkeypatch.setattr(decode_settings(), "mode", "compiled")  # inductor-fused step, then captured
    assert model.generate_content(prompt, GREEDY) == text
    assert model.decode_session.static.compiled and model.decode_session.static.graph is not None


def test_static_step_reads_no_tensor_values_on_the_host(tiny_model, monkeypatch) -> None:
    """What CUDA graph capture needs (checked here on CPU): a decode step never syncs to read a tensor's value."""
    llm = tiny_model.get_llm()
    with torch.inference_mode():
        dyn = make_cache(llm)
        _with_cache(llm, torch.arange(3, 12)[None], dyn)
    decoder = StaticDecoder(llm, 32, graph=False)
    decoder.load(dyn)
    reads: list[str] = []
    for name in ("item", "__bool__", "tolist", "__int__", "__float__", "__index__", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _n=name, _f=original, **k: (reads.append(_n), _f(self, *a, **k))[1])
    decoder.step(torch.tensor([[5]]))
    monkeypatch.undo()
    assert reads == []


def test_compiled_static_decode_matches_and_failures_are_errors(tiny_model, images, monkeypatch) -> None:
    """NVILA_QUANT_DECODE=compiled: the step traced whole by torch.compile (aot_eager here: the trace, without
    inductor's code generation) gives the same text; a compile that fails is an error naming why (the user asked
    for compiled steps by name), as is NVILA_QUANT_DECODE=graph without a GPU."""
    prompt = [images["cat"], "What is shown?"]
    monkeypatch.setattr(decode_settings(), "mode", "dynamic")
    text = tiny_model.generate_content(prompt, GREEDY)
    monkeypatch.setattr(decode_settings(), "mode", "compiled")
    monkeypatch.setattr(decode_settings(), "compile_backend", "aot_eager")
    torch._dynamo.reset()
    assert tiny_model.generate_content(prompt, GREEDY) == text
    assert tiny_model.decode_session.static.compiled
    tiny_model.decode_session.static = None
    monkeypatch.setattr(decode_settings(), "compile_backend", "no-such-backend")
    with pytest.raises(DecodeError, match="NVILA_QUANT_DECODE=compiled: torch.compile of the decode step "
                                          "\\(backend 'no-such-backend'\\) failed: InvalidBackend"):
        tiny_model.generate_content(prompt, GREEDY)
    tiny_model.decode_session.static = None
    monkeypatch.setattr(decode_settings(), "mode", "graph")
    with pytest.raises(DecodeError, match="NVILA_QUANT_DECODE=graph replays CUDA graphs, which need a CUDA device; "
                                          "the model is on cpu"):
        tiny_model.generate_content(prompt, GREEDY)
    assert tiny_model.decode_session.static is None
