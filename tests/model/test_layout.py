"""The flat "-hf" layout: read everywhere, written by the factory and ``convert``, and equal to the three folders.

The oracle for "same model" is the three-folder checkpoint with the same weights: logits must be bit-identical
(the layouts only rename tensors), greedy answers identical, and a round trip must give every tensor back.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GenerationConfig

from nvila_quant.errors import CheckpointError, ConfigError
from nvila_quant.export.convert import convert
from nvila_quant.formats.checkpoint import read_quantized_submodel
from nvila_quant.io import INDEX_NAME, load_state_dict, read_json
from nvila_quant.model import NVILAQwen2
from nvila_quant.model.config import NVILAConfig, load_config
from nvila_quant.quant.config import AWQConfig
from nvila_quant.quant.runner import quantize

VARIANTS = ["nvila", "nvila_lite"]


@pytest.fixture(scope="module")
def pairs(tiny_nvila, tiny_nvila_hf, tiny_nvila_lite, tiny_nvila_lite_hf):
    return {"nvila": (tiny_nvila, tiny_nvila_hf), "nvila_lite": (tiny_nvila_lite, tiny_nvila_lite_hf)}


def _photo(w: int = 500, h: int = 300, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))


def _answer(model: NVILAQwen2, image: Image.Image) -> tuple[str, torch.Tensor]:
    ids = model.tokenizer("a photo of a cat", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model.llm(input_ids=ids).logits
    text = model.generate_content([image, "Describe the image."], GenerationConfig(max_new_tokens=8, do_sample=False))
    return text, logits


def _stored_keys(root) -> set[str]:
    return set(read_json(root / INDEX_NAME)["weight_map"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_factory_writes_the_flat_layout(pairs, variant):
    _, hf = pairs[variant]
    cfg = read_json(hf / "config.json")
    assert cfg["model_type"] == variant
    assert cfg["architectures"] == [{"nvila": "NVILAForConditionalGeneration",
                                     "nvila_lite": "NVILALiteForConditionalGeneration"}[variant]]
    assert cfg["text_config"]["model_type"] == "qwen2" and cfg["vision_config"]["model_type"] == "siglip_vision_model"
    assert "quantization_config" not in cfg
    keys = _stored_keys(hf)
    assert {k.split(".")[0] for k in keys} == {"llm", "vision_tower", "mm_projector"}
    assert all(k.startswith("vision_tower.vision_model.") for k in keys if k.startswith("vision_tower."))
    layers = {int(k.split(".")[2]) for k in keys if k.startswith("mm_projector.layers.")}
    assert layers == ({1, 2, 4} if variant == "nvila" else {1, 2, 4, 5, 7})  # SGLang's module indices
    tok = NVILAConfig.from_pretrained(hf)
    assert tok.layout == "hf" and tok.variant == variant
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf), trust_remote_code=False)
    assert tokenizer.image_token == "<image>" and tokenizer.video_token == "<vila/video>"
    assert tokenizer.convert_tokens_to_ids("<image>") == cfg["image_token_id"]
    assert tokenizer.convert_tokens_to_ids("<vila/video>") == cfg["video_token_id"]
    assert cfg["text_config"]["vocab_size"] >= len(tokenizer)  # media token rows exist in the embeddings
    for name in ("configuration_nvila.py", "processing_nvila.py", "processor_config.json",
                 "preprocessor_config.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (hf / name).is_file(), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_flat_and_three_folder_give_the_same_model(pairs, variant):
    """Bit-identical logits and the same greedy answer on an image from both layouts (fp32)."""
    vila, hf = pairs[variant]
    a = NVILAQwen2.load_pretrained(vila, torch_dtype=torch.float32, device="cpu")
    b = NVILAQwen2.load_pretrained(hf, torch_dtype=torch.float32, device="cpu")
    for name in ("vision_tower", "mm_projector"):
        sa = getattr(a, name).state_dict()
        sb = getattr(b, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ta, la = _answer(a, _photo())
    tb, lb = _answer(b, _photo())
    assert torch.equal(la, lb)
    assert ta == tb and ta


def test_hf_geometry_comes_from_the_model_type(tiny_nvila_hf, tmp_path):
    """A third-party -hf config carries no geometry: NVILA's stock S2 / projector / feature layer apply."""
    root = tmp_path / "third-party"
    shutil.copytree(tiny_nvila_hf, root)
    cfg = read_json(root / "config.json")
    ours = {k: cfg.pop(k) for k in list(cfg) if k in ("mm_projector_type", "image_aspect_ratio", "s2_scales",
                                                       "s2_resize_output_to_scale_idx", "mm_vision_select_layer",
                                                       "mm_vision_select_feature", "max_tiles", "min_tiles")}
    (root / "config.json").write_text(json.dumps(cfg))
    got = NVILAConfig.from_pretrained(root)
    assert got.s2_scales == [448, 896, 1344] and got.image_aspect_ratio == "dynamic_s2"
    assert got.mm_projector_cfg["mm_projector_type"] == ours["mm_projector_type"] == "mlp_downsample_2x2_fix"
    assert got.mm_vision_select_layer == -2 and got.s2_resize_output_to_scale_idx == -1 and got.max_tiles == 12
    # the Lite repos' model_type "vila": the variant comes from the architectures, else the projector's tensors
    cfg["model_type"] = "vila"
    cfg.pop("architectures")
    (root / "config.json").write_text(json.dumps(cfg))
    assert NVILAConfig.from_pretrained(root).variant == "nvila"


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_is_bit_exact(pairs, variant, tmp_path):
    vila, hf = pairs[variant]
    back = tmp_path / "back"
    convert(hf, back, "vila", progress=False)
    for sub in ("vision_tower", "mm_projector"):
        a, b = load_state_dict(vila / sub), load_state_dict(back / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = load_state_dict(vila / "llm"), load_state_dict(back / "llm")
    for k in a:  # embeddings gained the media tokens' rows (the runtime's mean rows); the rest is identical
        assert torch.equal(a[k], b[k][: a[k].shape[0]]), k
    again = tmp_path / "again"
    convert(back, again, "hf", progress=False)
    with safe_open(str(hf / "model.safetensors"), "pt") as x, safe_open(str(again / "model.safetensors"), "pt") as y:
        assert set(x.keys()) == set(y.keys())
        assert all(torch.equal(x.get_tensor(k), y.get_tensor(k)) for k in x.keys())


@pytest.fixture(scope="module")
def rtn_symmetric(tiny_nvila, tmp_path_factory):
    """RTN of the tiny NVILA without zero points (what every engine's format can take), three folders."""
    out = tmp_path_factory.mktemp("q") / "rtn-sym"
    return quantize(tiny_nvila, AWQConfig(method="rtn", zero_point=False), None, out, progress=False).output


def test_quantized_round_trip_keeps_the_int4_codes(rtn_symmetric, tmp_path):
    hf = tmp_path / "hf"
    manifest = convert(rtn_symmetric, hf, "hf", progress=False)
    cfg = read_json(hf / "config.json")
    qc = cfg["quantization_config"]
    # AutoAWQ GEMM always carries qzeros (8 for symmetric codes), so zero_point stays true (awq_marlin needs it)
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["zero_point"]) == ("awq", 4, 128, True)
    assert cfg["nvila_quant"]["symmetric"] is True
    assert {"vision_tower", "mm_projector", "lm_head"} <= set(qc["modules_to_not_convert"])
    assert "text_config" in cfg and "quantization_config" not in cfg["text_config"]
    assert any("dequantized" in n for n in manifest["notes"])  # the quantized projector is written in float
    back = tmp_path / "back"
    convert(hf, back, "vila", progress=False)
    _, qa, sa = read_quantized_submodel(rtn_symmetric / "llm")
    _, qb, sb = read_quantized_submodel(back / "llm")
    assert qa.keys() == qb.keys() and all(qa[k].equal(qb[k]) for k in qa)
    assert (sa.format, sa.group_size, sa.symmetric) == (sb.format, sb.group_size, sb.symmetric)
    # compressed-tensors in the flat layout too
    ct = tmp_path / "ct"
    convert(rtn_symmetric, ct, "hf", fmt="compressed-tensors", progress=False)
    assert read_json(ct / "config.json")["quantization_config"]["quant_method"] == "compressed-tensors"
    _, qc_, _ = read_quantized_submodel(load_config(ct).part("llm"))
    assert all(qa[k].equal(qc_[k]) for k in qa)


def test_quantize_to_and_from_the_flat_layout(tiny_nvila, tiny_nvila_hf, tmp_path):
    """rtn on the -hf input (output layout = the input's) and --layout hf from three folders give the same int4
    codes and the same model as the three-folder run (LLM only: the projector stays float in every layout)."""
    config = AWQConfig(method="rtn", targets="llm")
    ref = quantize(tiny_nvila, config, None, tmp_path / "ref", progress=False).output
    from_hf = quantize(tiny_nvila_hf, config, None, tmp_path / "from-hf", progress=False).output
    to_hf = quantize(tiny_nvila, config, None, tmp_path / "to-hf", progress=False, layout="hf").output
    assert load_config(from_hf).layout == "hf" and load_config(to_hf).layout == "hf"
    assert (from_hf / "quant_log.json").is_file() and (from_hf / "quantization" / "awq_results.safetensors").is_file()
    _, q_ref, _ = read_quantized_submodel(ref / "llm")
    for out in (from_hf, to_hf):
        _, q, _ = read_quantized_submodel(load_config(out).part("llm"))
        assert q.keys() == q_ref.keys() and all(q[k].equal(q_ref[k]) for k in q)
    answers = [_answer(NVILAQwen2.load_pretrained(p, torch_dtype=torch.float32, device="cpu"), _photo(seed=3))
               for p in (ref, from_hf, to_hf)]
    assert all(torch.equal(answers[0][1], a[1]) and answers[0][0] == a[0] for a in answers[1:])


# ------------------------------------------------------------------------------------------------ bad input
def test_unrecognised_layout_names_the_keys(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match=r"llm_cfg.*text_config.*vision_config.*'llama'"):
        NVILAConfig.from_pretrained(tmp_path)


def _truncate(path, key: str) -> tuple[tuple, tuple]:
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    old = tuple(tensors[key].shape)
    tensors[key] = tensors[key][: old[0] // 2].clone()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return old, tuple(tensors[key].shape)


@pytest.mark.parametrize("layout", ["vila", "hf"])
def test_truncated_weight_names_tensor_and_shapes(tiny_nvila, tiny_nvila_hf, tmp_path, layout):
    src = tiny_nvila if layout == "vila" else tiny_nvila_hf
    root = tmp_path / "bad"
    shutil.copytree(src, root)
    key = "model.layers.1.self_attn.q_proj.weight"
    file = root / "llm" / "model.safetensors" if layout == "vila" else root / "model.safetensors"
    expected, got = _truncate(file, key if layout == "vila" else f"llm.{key}")
    with pytest.raises(CheckpointError) as e:
        NVILAQwen2.load_pretrained(root, torch_dtype=torch.float32, device="cpu")
    msg = str(e.value)
    assert key in msg and str(got) in msg and str(expected) in msg


def test_convert_refusals_write_nothing(tiny_nvila, rtn_symmetric, tmp_path, caplog):
    asym = quantize(tiny_nvila, AWQConfig(method="rtn"), None, tmp_path / "asym", progress=False).output
    cases = [
        (asym, "trtllm", None, r"zero points.*--no-zero-point"),
        (rtn_symmetric, "hf", "tinychat", r"autoawq or compressed-tensors"),
        (rtn_symmetric, "sglang", None, r"unknown --to 'sglang'"),
        (tiny_nvila, "hf", "autoawq", r"applies to a quantized checkpoint"),
    ]
    for src, to, fmt, pattern in cases:
        out = tmp_path / f"out-{to}-{fmt}"
        with pytest.raises(ConfigError, match=pattern):
            convert(src, out, to, fmt=fmt, progress=False)
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*"))
    # geometry SGLang hard-codes differently (the tiny tower is 64 wide, not 1152): exported with a warning
    with caplog.at_level(logging.WARNING):
        convert(tiny_nvila, tmp_path / "warned", "hf", progress=False)
    assert any("SGLang would mis-serve" in r.getMessage() and "mm_hidden_size" in r.getMessage()
               for r in caplog.records)


def test_hf_input_keeps_its_remote_code(tiny_nvila_hf, tmp_path):
    """From an -hf input, its own remote code, processor files, model_type and auto_map are carried over unchanged."""
    src = tmp_path / "nvidia-like"
    shutil.copytree(tiny_nvila_hf, src)
    (src / "modeling_nvila.py").write_text("# the checkpoint's own modeling code\n")
    with open(src / "processing_nvila.py", "a") as f:
        f.write("# patched by the checkpoint's authors\n")
    cfg = read_json(src / "config.json")
    cfg["auto_map"]["AutoModel"] = "modeling_nvila.NVILAForConditionalGeneration"
    (src / "config.json").write_text(json.dumps(cfg))
    out = quantize(src, AWQConfig(method="rtn", targets="llm"), None, tmp_path / "q", progress=False).output
    for name in ("modeling_nvila.py", "processing_nvila.py", "configuration_nvila.py", "processor_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    got = read_json(out / "config.json")
    assert got["auto_map"] == cfg["auto_map"] and got["model_type"] == cfg["model_type"]
    assert got["quantization_config"]["quant_method"] == "awq"


def test_flat_layout_refuses_what_one_quantization_config_cannot_state():
    from nvila_quant.formats.checkpoint import QuantSpec
    from nvila_quant.model.layout import check_flat_quantization

    layer = "model.layers.0"
    full = [f"{layer}.self_attn.{p}_proj" for p in "qkvo"] + [f"{layer}.mlp.{p}_proj" for p in ("gate", "up", "down")]
    check_flat_quantization(QuantSpec("autoawq", 4, 128, False), full, "autoawq")  # all int4: fine
    with pytest.raises(ConfigError, match=r"k_proj.*quantized but .*v_proj float"):
        check_flat_quantization(QuantSpec("autoawq", 4, 128, False), [m for m in full if "v_proj" not in m], "autoawq")
    with pytest.raises(ConfigError, match=r"group size than 128 .*--group-size"):
        check_flat_quantization(QuantSpec("autoawq", 4, 128, False, {f"{layer}.mlp.down_proj": 64}), full, "autoawq")
    with pytest.raises(ConfigError, match="pass --format autoawq"):
        check_flat_quantization(QuantSpec("tinychat", 4, 128, False), full, "tinychat")
