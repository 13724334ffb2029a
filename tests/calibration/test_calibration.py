"""Calibration sources, sample building, and embedding through the real NVILA pipeline."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch

from nvila_quant.calibration import (
    CalibrationError,
    CalibrationSet,
    build_samples,
    check_images,
    embed_samples,
    load_records,
    replay,
)
from nvila_quant.calibration.samples import IMAGE_PROMPTS, TEXT_PROMPTS
from nvila_quant.calibration.sources import load_coco
from nvila_quant.model.tokenizer import IGNORE_INDEX, tokenize_conversation
from nvila_quant.paths import builtin_calib_dir


def test_builtin_records():
    records = load_records("builtin")
    assert sum(r.kind == "image" for r in records) == 6 and sum(r.kind == "text" for r in records) == 20
    check_images(records)
    assert all(r.text for r in records)


def test_jsonl_and_folder_sources(tmp_path):
    shutil.copy(builtin_calib_dir() / "cat.jpg", tmp_path / "cat.jpg")
    lines = [{"image": "cat.jpg", "text": "a cat"}, {"text": "only text"}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    records = load_records(tmp_path / "data.jsonl")
    assert [r.kind for r in records] == ["image", "text"] and records[0].image == tmp_path / "cat.jpg"
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "cat.jpg", "text": "a cat"}) + "\n")
    assert [r.kind for r in load_records(tmp_path)] == ["image"]


@pytest.mark.parametrize("content,match", [
    ("", "holds no samples"),
    ("not json\n", r"data.jsonl:1 is not valid JSON"),
    ('["a list"]\n', r"data.jsonl:1 must be a JSON object"),
    ('{"text": "ok"}\n{"image": "x.jpg"}\n', r"data.jsonl:2 needs a non-empty string field 'text'"),
    ('{"image": 3, "text": "t"}\n', "must be a path string"),
])
def test_bad_jsonl_is_a_clear_error(tmp_path, content, match):
    (tmp_path / "data.jsonl").write_text(content)
    with pytest.raises(CalibrationError, match=match):
        load_records(tmp_path / "data.jsonl")


def test_missing_image_and_bad_paths(tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "gone.jpg", "text": "t"}) + "\n")
    with pytest.raises(CalibrationError, match=r"data.jsonl:1: image file not found: .*gone.jpg"):
        check_images(load_records(tmp_path / "data.jsonl"))
    (tmp_path / "bad.jpg").write_text("not an image")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "bad.jpg", "text": "t"}) + "\n")
    with pytest.raises(CalibrationError, match="cannot read image"):
        check_images(load_records(tmp_path / "bad.jsonl"))
    with pytest.raises(CalibrationError, match="is not 'builtin', 'coco', a folder or a .jsonl file"):
        load_records(tmp_path / "nothing-here")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match="neither metadata.jsonl"):
        load_records(empty)


def test_coco_offline_fails_at_once_naming_calib_path(monkeypatch):
    """Offline, ``--calib coco`` fails before any network access (nothing to wait for) and names the local way."""
    import datasets

    def no_network(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("load_coco touched the network while offline")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(datasets, "load_dataset", no_network)
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv(var, "1")
        with pytest.raises(CalibrationError, match=f"{var} is set; .*--calib FOLDER"):
            load_coco(4)


def test_build_samples_ratio_seed_and_top_up():
    records = load_records("builtin")  # 6 images, 20 texts
    samples = build_samples(records, 8, 0.25, seed=0)
    assert [s.kind for s in samples].count("text") == 2 and len(samples) == 8
    assert [s.origin for s in samples] == [s.origin for s in build_samples(records, 8, 0.25, seed=0)]
    assert [s.origin for s in samples] != [s.origin for s in build_samples(records, 8, 0.25, seed=1)]
    topped = build_samples(records, 12, 0.25, seed=0)  # wants 9 images, has 6: texts fill in
    assert [s.kind for s in topped].count("image") == 6 and len(topped) == 12
    captions = {r.origin: r.text for r in records}
    for s in samples:  # the assistant turn is the record's own caption / text, the prompt one of the instructions
        assert s.conversation[1] == {"from": "gpt", "value": captions[s.origin]}
        prompt = s.conversation[0]["value"][1] if s.kind == "image" else s.conversation[0]["value"]
        assert prompt in (IMAGE_PROMPTS if s.kind == "image" else TEXT_PROMPTS)
    img = next(s for s in samples if s.kind == "image")
    assert not isinstance(img.conversation[0]["value"][0], str)
    with pytest.raises(CalibrationError, match="no image calibration samples"):
        build_samples([r for r in records if r.kind == "text"], 4, 0.0)


def test_embedding_is_the_generation_pipeline(tiny_model, tmp_path):
    records = load_records("builtin")
    samples = build_samples(records, 2, 0.5, seed=3)
    calib = embed_samples(tiny_model, samples, seqlen=100_000, progress=False)
    image, text = calib.samples
    assert image.kind == "image" and text.kind == "text"
    # the same splice generation uses: prepare_media + chat template + _embed
    conv = samples[0].fresh_conversation()
    media, media_config = tiny_model.prepare_media(conv)
    ids = tokenize_conversation(conv, tiny_model.tokenizer)
    embeds, _, _ = tiny_model.embed_inputs(ids[None], media, media_config, None, None)
    assert torch.equal(image.hidden, embeds)
    assert image.vision.shape[0] == image.n_tiles == 14 and image.block_sizes == [(3, 3)]
    assert image.visual_tokens == 2304 + 1 and int((image.labels == IGNORE_INDEX).sum()) == image.visual_tokens
    assert calib.projector_inputs[0].shape == (9, 1024, tiny_model.get_mm_projector().mm_hidden_size)
    assert text.vision is None and text.visual_tokens == 0
    # replay from the vision cache (no vision tower) gives identical inputs and projector inputs
    again = replay(tiny_model, calib)
    assert all(torch.equal(a.hidden, b.hidden) for a, b in zip(calib.samples, again.samples, strict=True))
    assert torch.equal(again.projector_inputs[0], calib.projector_inputs[0])
    # the cache round-trips
    calib.save(tmp_path / "c.safetensors")
    loaded = CalibrationSet.load(tmp_path / "c.safetensors")
    assert torch.equal(loaded.samples[0].vision, image.vision) and loaded.samples[0].block_sizes == [(3, 3)]
    assert loaded.summary()["tokens"] == calib.summary()["tokens"]
    short = embed_samples(tiny_model, samples[:1], seqlen=64, capture_projector=False, progress=False)
    assert short.samples[0].tokens == 64 and short.samples[0].full_length == image.tokens


def test_embedding_dynamic_tiling(tiny_nvila_lite):
    from nvila_quant.model import NVILAQwen2

    model = NVILAQwen2.load_pretrained(tiny_nvila_lite, torch_dtype=torch.float32, device="cpu")
    rocket = [r for r in load_records("builtin") if "rocket" in str(r.image)]  # tall: several tiles + thumbnail
    calib = embed_samples(model, build_samples(rocket, 1, 0.0), seqlen=100_000, progress=False)
    s = calib.samples[0]
    assert s.block_sizes is None and s.n_tiles > 1 and s.vision.shape[0] == s.n_tiles
    assert torch.equal(replay(model, calib).samples[0].hidden, s.hidden)
