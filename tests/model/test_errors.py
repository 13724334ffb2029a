"""Bad input gets a clear error naming the file or field, and nothing is lost."""

from __future__ import annotations

import json
import shutil

import PIL.Image
import pytest
import torch

from nvila_quant.errors import CheckpointError, ConfigError, MediaError, OutputExistsError, PromptError
from nvila_quant.model import Image, NVILAQwen2
from nvila_quant.model.tokenizer import tokenize_conversation
from nvila_quant.testing.factory import make_tiny


@pytest.fixture
def ckpt(tiny_nvila, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(tiny_nvila, out)
    return out


def _load(path):
    return NVILAQwen2.load_pretrained(path, torch_dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("sub", ["llm", "vision_tower", "mm_projector"])
def test_missing_subfolder(ckpt, sub):
    shutil.rmtree(ckpt / sub)
    with pytest.raises(CheckpointError, match=f"missing sub-folder {sub}/"):
        _load(ckpt)


def test_missing_model_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        _load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing file: .*config.json"):
        _load(tmp_path / "empty")


def test_truncated_safetensors(ckpt):
    path = ckpt / "llm" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="llm/model.safetensors is truncated or corrupt"):
        _load(ckpt)


def test_corrupt_safetensors_header(ckpt):
    path = ckpt / "mm_projector" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json !!!"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="mm_projector/model.safetensors is corrupt"):
        _load(ckpt)


def test_pickled_weights_refused(ckpt):
    (ckpt / "mm_projector" / "model.safetensors").rename(ckpt / "mm_projector" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickles are never loaded"):
        _load(ckpt)


def test_unknown_projector_type(ckpt):
    cfg_path = ckpt / "mm_projector" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["mm_projector_type"] = "mlp_wizard"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown mm_projector_type 'mlp_wizard'"):
        _load(ckpt)


def test_projector_weights_disagree_with_type(ckpt):
    cfg_path = ckpt / "mm_projector" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["mm_projector_type"] = "mlp2x_gelu"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match projector type 'mlp2x_gelu'"):
        _load(ckpt)


def test_bad_root_config_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["image_aspect_ratio"] = "stretch"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'image_aspect_ratio' is 'stretch'"):
        _load(ckpt)


def test_unreadable_image(tiny_model, tmp_path):
    bad = tmp_path / "photo.jpg"
    bad.write_text("not an image")
    with pytest.raises(MediaError, match="photo.jpg"):
        tiny_model.generate_content([Image(bad), "Describe."])


def test_prompt_media_mismatch(tiny_model):
    tok = tiny_model.tokenizer
    ids = tokenize_conversation([{"from": "human", "value": "<image><image>two?"}], tok, add_generation_prompt=True)
    image = PIL.Image.new("RGB", (64, 64))
    media, cfg = tiny_model.prepare_media([{"from": "human", "value": [image]}])
    with pytest.raises(PromptError, match="2 <image> token\\(s\\) but 1 image"):
        tiny_model.generate(ids[None], media, cfg)
    with pytest.raises(PromptError, match="2 <image> token\\(s\\) but no image"):
        tiny_model.stream_gen(ids[None], start_pos=0)
    with pytest.raises(PromptError, match="contains the media token '<image>'"):
        tiny_model.generate_content(["<image> what?"])
    with pytest.raises(PromptError, match="unsupported prompt part"):
        tiny_model.generate_content([42, "what?"])


def test_output_folder_exists(tiny_model, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        tiny_model.save_pretrained(out)
    with pytest.raises(OutputExistsError, match="already exists"):
        make_tiny(out)
    assert (out / "keep.txt").read_text() == "precious"


def test_failed_write_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "partial"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny_model, "save_llm", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny_model.save_pretrained(out)
    assert not out.exists() and not list(tmp_path.glob(".partial*"))
