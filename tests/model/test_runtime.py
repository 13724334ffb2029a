"""The runtime end to end: save/load, generation equivalence, KV-cached streaming, chat turns, video, dtypes."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from greedy_oracle import assert_greedy_answer
from safetensors import safe_open
from transformers import GenerationConfig

from nvila_quant.model import NVILAQwen2, Video
from nvila_quant.model.generation import ChatSession
from nvila_quant.model.tokenizer import IGNORE_INDEX, tokenize_conversation

GREEDY = GenerationConfig(do_sample=False, max_new_tokens=8)


def _half_tolerance(dtype: torch.dtype, logits: torch.Tensor) -> float:
    """How far two half-precision computations of the same logits may round apart: a few units in the last place
    of the largest logit."""
    return 4 * torch.finfo(dtype).eps * float(logits.float().abs().max())


def _prompt_ids(model, text):
    return tokenize_conversation([{"from": "human", "value": text}], model.tokenizer, add_generation_prompt=True)[None]


def test_save_load_identical_tensors(tiny_nvila, tmp_path):
    model = NVILAQwen2.load_pretrained(tiny_nvila, device="cpu")  # native bf16
    assert model.dtype == torch.bfloat16
    out = model.save_pretrained(tmp_path / "resaved")
    again = NVILAQwen2.load_pretrained(out, device="cpu")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the published layout: three folders, SigLIP keys under vision_model., projector under layers.
    with safe_open(str(out / "vision_tower" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("vision_model.") for k in f.keys())
    with safe_open(str(out / "mm_projector" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("layers.") for k in f.keys())
    root = json.loads((out / "config.json").read_text())
    assert root["model_type"] == "llava_llama" and root["s2_scales"] == "448,896,1344"
    assert root["llm_cfg"]["hidden_size"] == root["hidden_size"]
    assert (out / "llm" / "tokenizer_config.json").is_file()
    assert (out / "vision_tower" / "preprocessor_config.json").is_file()


def test_generate_content_equals_llm_generate(tiny_model, images):
    prompt = [images["rocket"], "What is shown?"]
    text = tiny_model.generate_content(prompt, GREEDY)
    # the same through the LLM's own generate on the same inputs_embeds
    conversation = [{"from": "human", "value": list(prompt)}]
    media, media_config = tiny_model.prepare_media(conversation)
    ids = tokenize_conversation(conversation, tiny_model.tokenizer, add_generation_prompt=True)[None]
    embeds, _, mask = tiny_model.embed_inputs(ids, media, media_config, None, None)
    out = tiny_model.get_llm().generate(
        inputs_embeds=embeds, attention_mask=mask, do_sample=False, max_new_tokens=8,
        eos_token_id=tiny_model.tokenizer.stop_token_ids, pad_token_id=tiny_model.tokenizer.pad_token_id,
    )
    assert text == tiny_model.tokenizer.decode(out[0], skip_special_tokens=True).strip()
    assert text  # the synthetic model says something
    # and streaming yields the same text
    assert "".join(tiny_model.stream_content(prompt, GREEDY)).strip() == text


def test_embed_labels_padding_truncation(tiny_model):
    tok = tiny_model.tokenizer
    image = PIL.Image.new("RGB", (300, 300), (200, 10, 10))
    conv = [{"from": "human", "value": [image, "hi"]}]
    media, cfg = tiny_model.prepare_media(conv)
    long_ids = _prompt_ids(tiny_model, conv[0]["value"])
    short_ids = torch.tensor([tok("hello", add_special_tokens=False).input_ids])
    pad = tok.pad_token_id
    ids = torch.full((2, long_ids.shape[1]), pad)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    ids[0], mask[0] = long_ids[0], True
    ids[1, : short_ids.shape[1]], mask[1, : short_ids.shape[1]] = short_ids[0], True
    labels = ids.clone()
    for side in ("right", "left"):
        embeds, out_labels, out_mask = tiny_model.embed_inputs(ids, media, cfg, labels, mask, padding_side=side)
        n_img = 2305  # 2304 tokens + "\n"
        assert embeds.shape[1] == long_ids.shape[1] - 1 + n_img
        assert out_mask[0].all() and int(out_mask[1].sum()) == short_ids.shape[1]
        row1 = out_mask[1].nonzero().flatten()
        assert (row1[0] == 0) if side == "right" else (row1[-1] == embeds.shape[1] - 1)
        assert (out_labels[0] == IGNORE_INDEX).sum() == n_img
        assert (out_labels[1][~out_mask[1]] == IGNORE_INDEX).all()
    old = tok.model_max_length
    tok.model_max_length = 100
    try:
        embeds, _, _ = tiny_model.embed_inputs(ids[:1], media, cfg, None, None)
        assert embeds.shape[1] == 100
    finally:
        tok.model_max_length = old


def test_stream_gen_chunked_equals_full_prefill(tiny_model, images):
    conv = [{"from": "human", "value": [images["cat"], "Describe the cat in detail please."]}]
    media, cfg = tiny_model.prepare_media(conv)
    ids = _prompt_ids(tiny_model, conv[0]["value"])
    full, n_full = tiny_model.stream_gen(ids, media, cfg, start_pos=0)
    # chunk 1: everything up to and including the image token; then two text chunks
    img_pos = int((ids[0] == tiny_model.tokenizer.media_token_ids["image"]).nonzero()[0])
    cut = img_pos + 1 + (ids.shape[1] - img_pos - 1) // 2
    l1, n1 = tiny_model.stream_gen(ids[:, :cut], media, cfg, start_pos=0)
    l2, n2 = tiny_model.stream_gen(ids[:, cut:], None, None, start_pos=n1, chunk_prefilling=True)
    assert n1 + n2 == n_full
    torch.testing.assert_close(torch.cat([l1, l2], dim=1), full, rtol=1e-4, atol=1e-4)
    # decode steps continue the cache: the next-token logits equal a full prefill of prompt + token
    nxt = full[:, -1].argmax(-1, keepdim=True)
    step, n = tiny_model.stream_gen(nxt, start_pos=n_full)
    assert n == 1
    ref, _ = tiny_model.stream_gen(torch.cat([ids, nxt], 1), media, cfg, start_pos=0)
    torch.testing.assert_close(step[:, -1], ref[:, -1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="chunk_prefilling=True"):
        tiny_model.stream_gen(ids[:, :3], start_pos=4, chunk_prefilling=False)


def test_second_chat_turn_reuses_cache(tiny_model, images, monkeypatch):
    calls = {"n": 0}
    vt = tiny_model.get_vision_tower()
    original = type(vt).forward

    def counting(self, x):
        calls["n"] += 1
        return original(self, x)

    monkeypatch.setattr(type(vt), "forward", counting)
    session = ChatSession(tiny_model)
    cfg = GenerationConfig(do_sample=False, max_new_tokens=4)
    first = session.send([images["coffee"], "What is this?"], cfg)
    assert calls["n"] == 1
    len_after_first = session.length
    # turn 2: no new media, only the new turn's tokens are prefilled; the image is not re-encoded
    captured = {}
    orig_stream_gen = type(tiny_model).stream_gen

    def spy(self, input_ids, media=None, media_cfg=None, start_pos=0, chunk_prefilling=False, **kw):
        captured.setdefault("first_call", (input_ids.shape[1], start_pos, chunk_prefilling))
        return orig_stream_gen(self, input_ids, media, media_cfg, start_pos, chunk_prefilling, **kw)

    monkeypatch.setattr(type(tiny_model), "stream_gen", spy)
    session.send("And the color?", cfg)
    assert calls["n"] == 1
    n_new, start, chunked = captured["first_call"]
    assert start > 0 and chunked and n_new < 40 and start <= len_after_first
    assert_greedy_answer(tiny_model, [images["coffee"], "What is this?"], first, 4)
    # the cached logits of turn 2 equal a fresh full prefill of the whole conversation
    monkeypatch.setattr(type(tiny_model), "stream_gen", orig_stream_gen)
    conv = [{"from": "human", "value": [images["coffee"], "What is this?"]}]
    media, mcfg = tiny_model.prepare_media(conv)
    history = [conv[0], {"from": "gpt", "value": session.messages[1]["value"]},
               {"from": "human", "value": "And the color?"}]
    ids = tokenize_conversation(history, tiny_model.tokenizer, add_generation_prompt=True)[None]
    cached = ChatSession(tiny_model)
    cached.send([images["coffee"], "What is this?"], cfg)
    gen_a = list(cached.stream_turn("And the color?", cfg))
    # the second turn on the cached prefix == a greedy answer to the whole conversation recomputed from scratch
    assert_greedy_answer(tiny_model, None, "".join(gen_a).strip(), 4, inputs=(ids, media, mcfg))


def test_several_images_and_video_are_single_tiles(tiny_model, images):
    h = tiny_model.config.hidden_size
    conv = [{"from": "human", "value": [images["cat"], images["rocket"], "Compare."]}]
    media, cfg = tiny_model.prepare_media(conv)
    assert len(media["image"]) == 2 and "block_sizes" not in cfg.get("image", {})
    blocks = tiny_model.encoders["image"](media["image"], {})
    assert [b.shape for b in blocks] == [(257, h), (257, h)]
    frames = [np.full((64, 96, 3), i * 30, dtype=np.uint8) for i in range(8)]
    conv = [{"from": "human", "value": [Video(frames=frames), "What happens?"]}]
    media, cfg = tiny_model.prepare_media(conv)
    assert conv[0]["value"] == "<vila/video>What happens?" and media["video"][0].shape == (8, 3, 448, 448)
    video_block = tiny_model.encoders["video"](media["video"], {})[0]
    assert video_block.shape == (8 * 257, h)  # Basic encoder: "\n" after every frame
    prompt = [Video(frames=frames), "What happens?"]
    assert_greedy_answer(tiny_model, prompt, tiny_model.generate_content(prompt, GREEDY), GREEDY.max_new_tokens)


def test_tsp_video_encoder_pools_frames(tiny_nvila, tmp_path):
    import shutil

    ckpt = tmp_path / "tsp"
    shutil.copytree(tiny_nvila, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["video_encoder"] = {"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[4, 1, 1], [1, 2, 2]]}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    model = NVILAQwen2.load_pretrained(ckpt, torch_dtype=torch.float32, device="cpu")
    frames = [np.full((64, 96, 3), i * 30, dtype=np.uint8) for i in range(8)]
    media, _ = model.prepare_media([{"from": "human", "value": [Video(frames=frames), "x"]}])
    block = model.encoders["video"](media["video"], {})[0]
    # [4,1,1]: 2 pooled frames x (256 + 1); [1,2,2]: 8 frames x (64 + 1)
    assert block.shape[0] == 2 * 257 + 8 * 65
    feats = model.encode_images(media["video"][0])  # (8, 256, H)
    torch.testing.assert_close(block[:256], feats[:4].mean(0), rtol=1e-5, atol=1e-5)


def test_nvila_lite_tiles_with_thumbnail(tiny_nvila_lite):
    model = NVILAQwen2.load_pretrained(tiny_nvila_lite, torch_dtype=torch.float32, device="cpu")
    image = PIL.Image.new("RGB", (1792, 896), (40, 90, 160))
    conv = [{"from": "human", "value": [image, "Describe."]}]
    media, cfg = model.prepare_media(conv)
    assert len(media["image"]) == 9  # 4x2 grid + thumbnail
    assert conv[0]["value"] == "<image>\n" * 9 + "Describe."
    blocks = model.encoders["image"](media["image"], {})
    assert all(b.shape == (122, model.config.hidden_size) for b in blocks)  # 11x11 tokens + "\n"
    assert_greedy_answer(model, [image, "Describe."], model.generate_content([image, "Describe."], GREEDY),
                         GREEDY.max_new_tokens)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_dtypes(tiny_nvila, images, dtype):
    model = NVILAQwen2.load_pretrained(tiny_nvila, torch_dtype=dtype, device="cpu")
    assert model.dtype == dtype and model.get_vision_tower().dtype == dtype
    assert next(model.get_mm_projector().parameters()).dtype == dtype
    logits, _ = model.stream_gen(_prompt_ids(model, "hello there"), start_pos=0)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    prompt = [images["cat"], "Hi"]
    assert_greedy_answer(model, prompt, model.generate_content(prompt, GREEDY), GREEDY.max_new_tokens,
                         tolerance=_half_tolerance(dtype, logits))


def test_benchmark_reports_phases(tiny_model, images, capsys):
    result = tiny_model.benchmark([images["cat"], "Describe."], max_new_tokens=4)
    for key in ("vision_encode_ms", "ttft_ms", "decode_tokens_per_s", "prefill_tokens"):
        assert result[key] > 0
    assert "time to first token" in capsys.readouterr().out


@pytest.mark.cuda
def test_runs_on_cuda(tiny_nvila, images):
    model = NVILAQwen2.load_pretrained(tiny_nvila, torch_dtype=torch.float16, device="cuda")
    prompt = [images["cat"], "Hi"]
    logits, _ = model.stream_gen(_prompt_ids(model, "hello there"), start_pos=0)
    assert_greedy_answer(model, prompt, model.generate_content(prompt, GREEDY), GREEDY.max_new_tokens,
                         tolerance=_half_tolerance(torch.float16, logits))
