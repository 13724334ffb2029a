"""The flat "-hf" NVILA layout as SGLang serves it: our remote code (config + processor) and the loader oracle.

- The remote code loads offline through AutoConfig / AutoProcessor (``trust_remote_code=True``).
- The processor, called the way SGLang's ``process_mm_data`` calls it, gives input ids and pixels whose SGLang-style
  splice (image features written over the media-token positions) equals our runtime's ``embed_inputs`` exactly:
  NVILA (dynamic S2) and NVILA-Lite (tiles + thumbnail), for square, landscape, portrait and tiny images, several
  images, a video, an image with a video.
- ``serving.sglang_rules`` accepts correct folders and rejects the mistakes an exporter can make.

The -hf folders are built here from the tiny three-folder models (the runtime's state dict, media tokens included).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file
from serving.sglang_rules import check_sglang_checkpoint

from nvila_quant.formats import autoawq
from nvila_quant.formats import compressed_tensors as ct
from nvila_quant.formats.checkpoint import pack_linear
from nvila_quant.model import NVILAQwen2, Video
from nvila_quant.model.remote_code import auto_map, processor_geometry, remote_code_dir, write_remote_code
from nvila_quant.numerics.qtensor import QTensor

ARCH = {"nvila": "NVILAForConditionalGeneration", "nvila-lite": "NVILALiteForConditionalGeneration"}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
NUM_FRAMES = 8  # SGLang's NVILA processor samples 8 frames (multimodal/processors/nvila.py)


# ---------------------------------------------------------------------------- building -hf folders
def write_hf(model: NVILAQwen2, root: Path, variant: str, fmt: str | None = None, group_size: int = 128,
             symmetric: bool = False) -> Path:
    """A flat -hf folder from a loaded runtime model: bf16 weights (LLM linears packed in ``fmt``), the set-up
    tokenizer with ``image_token`` / ``video_token``, config.json with our geometry keys, and the remote code."""
    root.mkdir(parents=True)
    tokenizer = model.tokenizer
    tokenizer.save_pretrained(str(root))
    tok_cfg = json.loads((root / "tokenizer_config.json").read_text())
    tok_cfg["extra_special_tokens"] = {"image_token": "<image>", "video_token": "<vila/video>"}
    (root / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))

    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("vision_tower.vision_tower."):
            bare = key.removeprefix("vision_tower.vision_tower.").removeprefix("vision_model.")
            key = f"vision_tower.vision_model.{bare}"
        tensors[key] = value.to(torch.bfloat16).contiguous()
    text_cfg = model.llm.config.to_dict()
    text_cfg.pop("quantization_config", None)
    text_cfg["dtype"] = "bfloat16"
    vision_cfg = model.vision_tower.config.to_dict()
    vision_cfg["dtype"] = "bfloat16"
    config: dict[str, Any] = {
        "architectures": [ARCH[variant]],
        "model_type": variant.replace("-", "_"),
        "auto_map": auto_map(variant),
        "text_config": text_cfg,
        "vision_config": vision_cfg,
        "image_token_id": tokenizer.media_token_ids["image"],
        "video_token_id": tokenizer.media_token_ids["video"],
        "dtype": "bfloat16",
    }
    geometry = processor_geometry(model.config, vision_cfg)
    config.update({k: v for k, v in geometry.items() if k not in ("image_size", "patch_size")})
    config.update({"mm_vision_select_layer": model.config.mm_vision_select_layer,
                   "mm_vision_select_feature": model.config.mm_vision_select_feature, "chat_template": None})
    if fmt is not None:
        for i in range(model.llm.config.num_hidden_layers):
            for linear in LINEARS:
                prefix = f"llm.model.layers.{i}.{linear}"
                weight, bias = tensors.pop(f"{prefix}.weight"), tensors.pop(f"{prefix}.bias", None)
                qt = QTensor.from_float(weight.float(), 4, group_size, not symmetric, bias=bias,
                                        scale_dtype=torch.bfloat16)
                tensors.update({f"{prefix}.{k}": v.contiguous() for k, v in pack_linear(fmt, qt).items()})
        module = autoawq if fmt == "autoawq" else ct
        config["quantization_config"] = module.quantization_config(4, group_size, symmetric,
                                                                   ["vision_tower", "mm_projector", "lm_head"])
    save_file(tensors, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(config, indent=2))
    write_remote_code(root, variant, model.vision_tower.image_processor.to_dict(), geometry)
    return root


@pytest.fixture(scope="module")
def lite_model(tiny_nvila_lite: Path) -> NVILAQwen2:
    return NVILAQwen2.load_pretrained(tiny_nvila_lite, torch_dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def models(tiny_model: NVILAQwen2, lite_model: NVILAQwen2) -> dict[str, NVILAQwen2]:
    return {"nvila": tiny_model, "nvila-lite": lite_model}


@pytest.fixture(scope="module")
def hf_dirs(models: dict[str, NVILAQwen2], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """NVILA quantized to AutoAWQ (group 128), NVILA-Lite in float."""
    base = tmp_path_factory.mktemp("hf")
    return {"nvila": write_hf(models["nvila"], base / "nvila-awq-hf", "nvila", "autoawq"),
            "nvila-lite": write_hf(models["nvila-lite"], base / "nvila-lite-hf", "nvila-lite")}


@pytest.fixture(scope="module")
def processors(hf_dirs: dict[str, Path]) -> dict[str, Any]:
    from transformers import AutoProcessor

    return {v: AutoProcessor.from_pretrained(str(root), trust_remote_code=True) for v, root in hf_dirs.items()}


# ---------------------------------------------------------------------------- SGLang's calls, reproduced
def sglang_mm_tokens(processor: Any, hf_config: Any) -> dict[str, Any]:
    """``MultimodalSpecialTokens(image_token=tokenizer.image_token, image_token_id=hf_config.image_token_id, ...)``
    and its combined regex (``get_combined_regex``)."""
    tokenizer = processor.tokenizer
    tokens = {"image_token": tokenizer.image_token, "image_token_id": hf_config.image_token_id,
              "video_token": tokenizer.video_token, "video_token_id": hf_config.video_token_id}
    tokens["regex"] = re.compile("(" + "|".join(f"(?:{re.escape(tokens[k])})" for k in
                                                ("image_token", "video_token")) + ")")
    return tokens


def sglang_process(processor: Any, hf_config: Any, prompt: str, images: list, videos: list) -> tuple[Any, list[dict]]:
    """``load_mm_data`` (token count per modality) -> ``process_mm_data`` (the processor call) ->
    ``collect_mm_items_from_processor_output`` + ``get_mm_items_offset`` + ``get_new_expanded_mm_items``."""
    mm = sglang_mm_tokens(processor, hf_config)
    parts = re.split(mm["regex"], prompt)
    assert sum(p == mm["image_token"] for p in parts) == len(images)  # fast path: tokens align with the data
    assert sum(p == mm["video_token"] for p in parts) == len(videos)
    kwargs: dict[str, Any] = {}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = [[np.asarray(f) for f in v] for v in videos]  # load_video frames .asnumpy()
    ret = processor(text=[prompt], padding=True, return_tensors="pt", device="cpu", do_sample_frames=True,
                    num_frames=NUM_FRAMES, **kwargs)
    input_ids = ret["input_ids"].flatten()
    items = []
    for modality, feature_key, token_key in (("image", "pixel_values", "image_token_id"),
                                             ("video", "pixel_values_videos", "video_token_id")):
        if feature_key not in ret:
            continue
        mask = (input_ids == mm[token_key]).tolist()
        runs = [i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1])]
        feature = ret[feature_key]
        extra = {"block_sizes": ret["block_sizes"]} if modality == "image" and "block_sizes" in ret else {}
        if len(runs) > 1 and feature.shape[0] == len(runs):  # bundled: split one item per run (_try_simple_split)
            for k in range(len(runs)):
                split = {key: [v[k]] for key, v in extra.items() if len(v) == len(runs)}
                items.append({"modality": modality, "feature": feature[k:k + 1], **split})
        else:
            assert len(runs) == 1, f"{len(runs)} {modality} runs for {feature.shape[0]} tiles: SGLang keeps a bundle"
            items.append({"modality": modality, "feature": feature, **extra})
    return ret, items


def sglang_embeds(model: NVILAQwen2, ret: Any, items: list[dict], hf_config: Any) -> torch.Tensor:
    """SGLang's ``general_mm_embed_routine`` with ``get_image_feature`` (our runtime's encode_images: the same
    numerics as sglang's models/nvila.py / nvila_lite.py): features written over the media-token positions."""
    ids = ret["input_ids"][0]
    embeds = model.llm.get_input_embeddings()(ids).clone()
    for modality, token_id in (("image", hf_config.image_token_id), ("video", hf_config.video_token_id)):
        group = [it for it in items if it["modality"] == modality]
        if not group:
            continue
        block_sizes = [b for it in group for b in it.get("block_sizes", [])] or None
        pixels = torch.cat([it["feature"] for it in group]).to(model.dtype)
        feats = model.encode_images(pixels, block_sizes=block_sizes if modality == "image" else None)
        feats = torch.cat(list(feats)) if isinstance(feats, list) else feats.reshape(-1, feats.shape[-1])
        positions = ids == token_id
        assert int(positions.sum()) == feats.shape[0], f"{modality}: {int(positions.sum())} tokens, {feats.shape}"
        embeds[positions] = feats.to(embeds.dtype)
    return embeds


# ---------------------------------------------------------------------------- media
def picture(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    grad = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
    noise = rng.integers(0, 60, (height, width, 3)).astype(np.float32)
    return PIL.Image.fromarray(np.clip(grad * 0.7 + noise, 0, 255).astype(np.uint8))


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    return [np.asarray(picture(64, 48, seed + i)) for i in range(n)]


CASES = {
    "square": lambda: [picture(1024, 1024)],
    "landscape": lambda: [picture(1920, 1080, 1)],
    "portrait": lambda: [picture(1080, 1920, 2)],
    "tiny": lambda: [picture(40, 30, 3)],
    "two_images": lambda: [picture(640, 480, 4), picture(300, 500, 5)],
    "video": lambda: [Video(frames=frames(12))],
    "image_and_video": lambda: [picture(500, 500, 6), Video(frames=frames(5, 20))],  # < the tiny model_max_length
}
FAST_CASES = {"nvila": ("landscape", "two_images", "video"), "nvila-lite": ("landscape", "two_images", "video")}


@pytest.mark.parametrize("variant", ["nvila", "nvila-lite"])
def test_auto_classes_load_offline(variant: str, hf_dirs: dict[str, Path], processors: dict[str, Any]) -> None:
    from transformers import AutoConfig, Qwen2Config, SiglipVisionConfig

    root = hf_dirs[variant]
    config = AutoConfig.from_pretrained(str(root), trust_remote_code=True)
    assert type(config).__name__ == ("NVILAConfig" if variant == "nvila" else "NVILALiteConfig")
    assert config.model_type == variant.replace("-", "_")
    assert isinstance(config.text_config, Qwen2Config) and isinstance(config.vision_config, SiglipVisionConfig)
    saved = json.loads((root / "config.json").read_text())
    assert config.text_config.hidden_size == saved["text_config"]["hidden_size"]
    assert config.image_aspect_ratio == ("dynamic_s2" if variant == "nvila" else "dynamic")
    assert config.s2_scales == saved["s2_scales"] and config.mm_projector_type == saved["mm_projector_type"]
    processor = processors[variant]
    assert type(processor).__name__ == "NVILAProcessor"
    tokenizer = processor.tokenizer
    assert (tokenizer.image_token, tokenizer.video_token) == ("<image>", "<vila/video>")
    assert tokenizer.convert_tokens_to_ids(tokenizer.image_token) == config.image_token_id
    assert tokenizer.convert_tokens_to_ids(tokenizer.video_token) == config.video_token_id
    if variant == "nvila":  # SGLang reads the quantization config from the top-level config
        assert config.quantization_config["quant_method"] == "awq"
    assert processor.image_aspect_ratio == config.image_aspect_ratio


@pytest.mark.parametrize("variant,case", [
    pytest.param(v, c, marks=() if c in FAST_CASES[v] else pytest.mark.slow) for v in ("nvila", "nvila-lite")
    for c in CASES
])
def test_processor_matches_runtime(variant: str, case: str, models: dict[str, NVILAQwen2],
                                   processors: dict[str, Any], hf_dirs: dict[str, Path],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """SGLang's processor call + splice == our runtime's ``prepare_media`` + ``embed_inputs``, bit for bit."""
    from transformers import AutoConfig

    model, processor = models[variant], processors[variant]
    encode = model.encode_images
    seen: list[tuple[torch.Tensor, Any, Any]] = []

    def remembered(images: torch.Tensor, block_sizes: Any = None) -> Any:
        """encode_images, run once per distinct input: the splice below reuses the runtime's result only for
        bit-identical pixels and equal block sizes."""
        for pixels, blocks, out in seen:
            if blocks == block_sizes and pixels.shape == images.shape and torch.equal(pixels, images):
                return out
        seen.append((images, block_sizes, encode(images, block_sizes=block_sizes)))
        return seen[-1][2]

    monkeypatch.setattr(model, "encode_images", remembered)
    hf_config = AutoConfig.from_pretrained(str(hf_dirs[variant]), trust_remote_code=True)
    media = CASES[case]()
    parts = [*media, "Describe what you see."]
    input_ids, runtime_media, media_config = model.prompt_inputs(parts)
    with torch.no_grad():
        expected, _, _ = model.embed_inputs(input_ids, runtime_media, media_config)

    images = [m for m in media if isinstance(m, PIL.Image.Image)]
    videos = [m.frames for m in media if isinstance(m, Video)]
    text = "".join("<image>" if isinstance(m, PIL.Image.Image) else "<vila/video>" for m in media)
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": text + "Describe what you see."}],
                                                 add_generation_prompt=True, tokenize=False)
    ret, items = sglang_process(processor, hf_config, prompt, images, videos)

    if images:
        assert torch.equal(ret["pixel_values"], torch.stack(runtime_media["image"]))  # tiles, in order
    if videos:
        assert torch.equal(ret["pixel_values_videos"], torch.cat(runtime_media["video"]))
    runtime_blocks = media_config.get("image", {}).get("block_sizes")
    assert ret.get("block_sizes") == (None if runtime_blocks is None else [tuple(b) for b in runtime_blocks])
    with torch.no_grad():
        got = sglang_embeds(model, ret, items, hf_config)
    assert got.shape == expected[0].shape
    assert torch.equal(got, expected[0])
    assert ret["attention_mask"].sum() == ret["input_ids"].shape[1]


def test_token_counts_follow_the_geometry(processors: dict[str, Any]) -> None:
    """Tokens derive from tile size, patch size, projector downsample and S2 block (nvila.md's NVILA-8B numbers)."""
    nvila, lite = processors["nvila"], processors["nvila-lite"]
    assert (nvila.tokens_per_tile, lite.tokens_per_tile) == (256, 121)
    assert [nvila.s2_tokens(b) for b in ((3, 3), (3, 4), (5, 2))] == [2304, 3072, 2560]
    patch16 = nvila.patch_size
    try:
        nvila.patch_size = 16  # 448 / 16 = 28 patches a side -> 14 x 14 after 2x2
        assert nvila.tokens_per_tile == 196 and nvila.s2_tokens((3, 3)) == 9 * 196
    finally:
        nvila.patch_size = patch16
    idx = nvila.s2_resize_output_to_scale_idx
    try:
        nvila.s2_resize_output_to_scale_idx = 0  # merged at 448 px: one tile's worth whatever the grid
        assert nvila.s2_tokens((3, 4)) == 256
    finally:
        nvila.s2_resize_output_to_scale_idx = idx
    ids = nvila(text="<image>", images=[picture(1920, 1080)])["input_ids"][0]
    newline = nvila.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert ids == [nvila.image_token_id] * 3072 + newline


def test_processor_batches_and_errors(processors: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    processor = processors["nvila-lite"]
    texts, images = ["<image>a", "b <image> and <image>"], [picture(500, 300), picture(64, 64, 1), picture(64, 80, 2)]
    batch = processor(text=texts, images=images, return_tensors="pt")
    one = processor(text=texts[0], images=images[:1], return_tensors="pt")
    two = processor(text=texts[1], images=images[1:], return_tensors="pt")
    assert torch.equal(batch["pixel_values"], torch.cat([one["pixel_values"], two["pixel_values"]]))
    for row, single in zip(batch["input_ids"], (one, two), strict=True):
        n = single["input_ids"].shape[1]
        kept = row[:n] if processor.tokenizer.padding_side == "right" else row[-n:]
        assert torch.equal(kept, single["input_ids"][0])
    assert batch["attention_mask"].sum(1).tolist() == [one["input_ids"].shape[1], two["input_ids"].shape[1]]
    with pytest.raises(ValueError, match="placeholder"):
        processor(text="<image><image>", images=[picture(64, 64)])
    with pytest.raises(ValueError, match="no placeholder"):
        processor(text="hello", images=[picture(64, 64)])
    monkeypatch.setattr(processor, "video_encoder", {"_target_": "llava.model.encoders.TSPVideoEncoder"})
    with pytest.raises(ValueError, match="TSPVideoEncoder"):  # temporal pooling: not what SGLang's model does
        processor(text="<vila/video>", videos=[frames(2)])


def test_write_remote_code_files(tmp_path: Path) -> None:
    write_remote_code(tmp_path, "nvila-lite", {"image_mean": [0.5] * 3, "image_std": [0.5] * 3},
                      {"max_tiles": 6, "mm_vision_select_layer": -2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configuration_nvila.py", "preprocessor_config.json",
                                                          "processing_nvila.py", "processor_config.json"]
    processor = json.loads((tmp_path / "processor_config.json").read_text())
    assert processor["auto_map"] == {"AutoProcessor": "processing_nvila.NVILAProcessor"}
    assert processor["processor_class"] == "NVILAProcessor" and processor["max_tiles"] == 6
    assert processor["image_aspect_ratio"] == "dynamic" and "mm_vision_select_layer" not in processor
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["processor_class"] == "NVILAProcessor"
    assert auto_map("nvila_lite")["AutoConfig"] == "configuration_nvila.NVILALiteConfig"
    assert (remote_code_dir() / "processing_nvila.py").read_text() == (tmp_path / "processing_nvila.py").read_text()
    with pytest.raises(ValueError, match="unknown processor geometry"):
        write_remote_code(tmp_path, "nvila", {}, {"s2_scale": [448]})


# ---------------------------------------------------------------------------- the oracle
def _mutate(src: Path, dst: Path, config: Any = None, tensors: Any = None, tokenizer: Any = None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        data = json.loads((dst / "config.json").read_text())
        config(data)
        (dst / "config.json").write_text(json.dumps(data))
    if tensors is not None:
        data = load_file(str(dst / "model.safetensors"))
        tensors(data)
        save_file(data, str(dst / "model.safetensors"))
    if tokenizer is not None:
        data = json.loads((dst / "tokenizer_config.json").read_text())
        tokenizer(data)
        (dst / "tokenizer_config.json").write_text(json.dumps(data))
    return dst


def test_oracle_accepts_correct_folders(hf_dirs: dict[str, Path]) -> None:
    assert check_sglang_checkpoint(hf_dirs["nvila"], stock_geometry=False, require_marlin=True) == []
    assert check_sglang_checkpoint(hf_dirs["nvila-lite"], stock_geometry=False) == []
    # the tiny widths are not SGLang's hard-coded MM_HIDDEN_SIZE: the stock check says so
    stock = check_sglang_checkpoint(hf_dirs["nvila"], load_processor=False)
    assert any("MM_HIDDEN_SIZE" in p for p in stock) and any("mm_projector.layers.1.weight" in p for p in stock)


def _q_to_float(t: dict[str, torch.Tensor], prefix: str) -> None:
    qt = autoawq.unpack({k.rsplit(".", 1)[1]: t.pop(k) for k in list(t) if k.startswith(f"{prefix}.")
                         and k.rsplit(".", 1)[1] in ("qweight", "qzeros", "scales")}, 4, 128, False, prefix)
    t[f"{prefix}.weight"] = qt.dequantize(torch.bfloat16)


def _quantize_vision(t: dict[str, torch.Tensor]) -> None:
    prefix = "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"
    qt = QTensor.from_float(t.pop(f"{prefix}.weight").float(), 4, 64, True, scale_dtype=torch.bfloat16)
    t.update({f"{prefix}.{k}": v for k, v in autoawq.pack(qt).items()})


def _quantize_lm_head(t: dict[str, torch.Tensor]) -> None:
    """AWQ tensors in place of lm_head.weight (shapes as packed; the tiny vocab is not a multiple of 8)."""
    n, k = t.pop("llm.lm_head.weight").shape
    t.update({"llm.lm_head.qweight": torch.zeros(k, -(-n // 8), dtype=torch.int32),
              "llm.lm_head.qzeros": torch.zeros(k // 128, -(-n // 8), dtype=torch.int32),
              "llm.lm_head.scales": torch.ones(k // 128, n, dtype=torch.bfloat16)})


MUTATIONS = {
    "unknown tensor name": ({"tensors": lambda t: t.update({"mm_projector.layers.3.weight": torch.ones(4)})},
                            "KeyError: mm_projector.layers.3.weight"),
    "quantized vision tower": ({"tensors": _quantize_vision}, "KeyError: vision_tower.vision_model.encoder.layers.0"),
    "quantization_config in text_config": (
        {"config": lambda c: c["text_config"].update(quantization_config=c.pop("quantization_config"))},
        "quantization_config sits in text_config"),
    "q_proj quantized, k_proj float": (
        {"tensors": lambda t: _q_to_float(t, "llm.model.layers.0.self_attn.k_proj")},
        "KeyError: llm.model.layers.0.self_attn.k_proj.weight"),
    "group size 256": ({"config": lambda c: c["quantization_config"].update(group_size=256)},
                       "group_size 256 not in marlin"),
    "missing image_token": ({"tokenizer": lambda c: c.pop("extra_special_tokens")},
                            "the tokenizer has no image_token"),
    "image_token_id unset": ({"config": lambda c: c.pop("image_token_id")}, "image_token_id is None"),
    "S2 scales SGLang does not run": ({"config": lambda c: c.update(s2_scales=[448, 896])},
                                      "SGLang hard-codes [448, 896, 1344]"),
    "lm_head quantized without lm_head: true": ({"tensors": _quantize_lm_head}, "KeyError: llm.lm_head.qweight"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_oracle_rejects(name: str, hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    change, expected = MUTATIONS[name]
    root = _mutate(hf_dirs["nvila"], tmp_path / "nvila-hf", **change)
    problems = check_sglang_checkpoint(root, stock_geometry=False, load_processor="tokenizer" in change)
    assert any(expected in p for p in problems), problems
    if name == "group size 256":  # not marlin -> plain AWQ, which takes fp16 only; the stored scales disagree too
        assert any("float16 only" in p for p in problems) and any("scales: shape" in p for p in problems)


def test_oracle_marlin_and_transformers_rules(hf_dirs: dict[str, Path]) -> None:
    root = hf_dirs["nvila"]
    # sm75: no marlin -> plain AWQ, bf16 checkpoint -> refused unless served in fp16
    assert any("float16 only" in p for p in check_sglang_checkpoint(root, stock_geometry=False, sm=75,
                                                                     load_processor=False))
    assert check_sglang_checkpoint(root, stock_geometry=False, sm=75, dtype="float16", load_processor=False) == []
    # tp=4: o_proj / down_proj K per rank (64, 160) is not a multiple of 128: those layers fall back from marlin
    fallbacks = check_sglang_checkpoint(root, stock_geometry=False, tp=4, require_marlin=True, load_processor=False)
    assert fallbacks and all("plain awq fallback" in p for p in fallbacks)
    # transformers 5.x: SiglipVisionModel has no vision_model level, SGLang's direct lookup misses every name
    v5 = check_sglang_checkpoint(root, stock_geometry=False, transformers_major=5, load_processor=False)
    assert any(p.startswith("KeyError: vision_tower.vision_model.embeddings") for p in v5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_oracle_compressed_tensors(symmetric: bool, models: dict[str, NVILAQwen2], tmp_path: Path) -> None:
    root = write_hf(models["nvila"], tmp_path / "nvila-ct-hf", "nvila", "compressed-tensors", 64, symmetric)
    assert check_sglang_checkpoint(root, stock_geometry=False, load_processor=False) == []
    older = check_sglang_checkpoint(root, stock_geometry=False, asymmetric_wna16=False, load_processor=False)
    assert (older == []) == symmetric
    # an ignore entry that covers q_proj alone splits the fused qkv_proj: SGLang refuses the scheme mix
    data = json.loads((root / "config.json").read_text())
    data["quantization_config"]["ignore"].append("model.layers.1.self_attn.q_proj")
    (root / "config.json").write_text(json.dumps(data))
    problems = check_sglang_checkpoint(root, stock_geometry=False, load_processor=False)
    assert any("covers only some shards of llm.model.layers.1.self_attn.qkv_proj" in p for p in problems)


@pytest.mark.parametrize("variant", ["nvila", "nvila-lite"])
def test_make_tiny_hf_layout_serves_in_sglang(variant: str, tmp_path: Path) -> None:
    """The package's own -hf writer (make_tiny(layout="hf")): the oracle accepts it, and our runtime loaded from it
    embeds a prompt exactly as SGLang would with the shipped processor."""
    import inspect

    from transformers import AutoConfig, AutoProcessor

    from nvila_quant.testing.factory import TinySpec, make_tiny

    if "layout" not in inspect.signature(make_tiny).parameters:
        pytest.skip("make_tiny has no layout= yet")
    root = make_tiny(tmp_path / f"{variant}-hf", TinySpec(variant=variant, seed=0), layout="hf")
    assert check_sglang_checkpoint(root, stock_geometry=False) == []
    model = NVILAQwen2.load_pretrained(root, torch_dtype=torch.float32, device="cpu")
    processor = AutoProcessor.from_pretrained(str(root), trust_remote_code=True)
    hf_config = AutoConfig.from_pretrained(str(root), trust_remote_code=True)
    image = picture(1920, 1080, 1)
    input_ids, media, media_config = model.prompt_inputs([image, "Describe what you see."])
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "<image>Describe what you see."}],
                                                 add_generation_prompt=True, tokenize=False)
    ret, items = sglang_process(processor, hf_config, prompt, [image], [])
    with torch.no_grad():
        expected, _, _ = model.embed_inputs(input_ids, media, media_config)
        assert torch.equal(sglang_embeds(model, ret, items, hf_config), expected[0])
