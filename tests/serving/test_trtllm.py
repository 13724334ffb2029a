"""``--to trtllm``: the ModelOpt W4A16_AWQ packer and the TensorRT-LLM export of tiny NVILAs, checked by an
independent oracle of TRT-LLM's loader rules (``serving/trtllm_rules.py``), which must also catch broken exports."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from serving.trtllm_rules import check_trtllm_checkpoint, dequantized_llm_weights, read_header, unpack_w4a16_awq

from nvila_quant import __version__
from nvila_quant.errors import CheckpointError, ConfigError
from nvila_quant.export.trtllm import MANIFEST_NAME, write_trtllm
from nvila_quant.formats import modelopt
from nvila_quant.formats.checkpoint import read_quantized_submodel
from nvila_quant.io import load_state_dict
from nvila_quant.model.quantized import float_projector_state
from nvila_quant.numerics.qtensor import QTensor
from nvila_quant.quant.config import AWQConfig
from nvila_quant.quant.runner import quantize
from nvila_quant.testing.factory import TinySpec, make_tiny

FUSED_MEMBERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def _export(src: Path, out: Path) -> tuple[Path, dict]:
    out.mkdir(parents=True)
    return out, write_trtllm(src, out, progress=False)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def rtn_sym(tmp_path_factory, tiny_nvila) -> Path:
    """The tiny NVILA (bf16) quantized symmetric by RTN, AutoAWQ format (llm and projector)."""
    out = tmp_path_factory.mktemp("trt") / "rtn-sym"
    return quantize(tiny_nvila, AWQConfig(method="rtn", zero_point=False), None, out, progress=False).output


@pytest.fixture(scope="module")
def rtn_export(tmp_path_factory, rtn_sym) -> tuple[Path, dict]:
    return _export(rtn_sym, tmp_path_factory.mktemp("trt") / "rtn-sym-trtllm")


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("trt") / "tiny-fp32", TinySpec(dtype="float32", llm_layers=2, seed=3))


# ---------------------------------------------------------------------------------------------- the packer
def test_pack_layout_on_a_hand_built_weight() -> None:
    """Values q - 8, output rows 2i (low nibble) and 2i + 1 (high nibble) in byte row i, int8 bytes."""
    q = torch.tensor([[9, 0, 15], [6, 8, 7], [8, 1, 2], [15, 14, 0]], dtype=torch.uint8)  # (N=4, K=3), G = K
    qt = QTensor(q, torch.tensor([[0.5], [1.0], [2.0], [4.0]], dtype=torch.bfloat16), torch.full((4, 1), 8), 4, -1,
                 True)
    parts = modelopt.pack(qt)
    # signed: row0 [1, -8, 7], row1 [-2, 0, -1], row2 [0, -7, -6], row3 [7, 6, -8]
    expected = torch.tensor([[0xE1, 0x08, 0xF7], [0x70, 0x69, 0x8A]], dtype=torch.uint8).view(torch.int8)
    assert parts["weight"].dtype == torch.int8 and torch.equal(parts["weight"], expected)
    assert torch.equal(parts["weight_scale"], qt.scale) and parts["weight_scale"].dtype == torch.bfloat16
    assert torch.equal(parts["pre_quant_scale"], torch.ones(3, dtype=torch.bfloat16))
    assert torch.equal(unpack_w4a16_awq(parts["weight"], qt.scale, 3).to(torch.bfloat16), qt.dequantize())


@pytest.mark.parametrize("n,k,g", [(2, 32, 32), (6, 64, -1), (130, 256, 128), (256, 384, 64)])
def test_pack_unpack_round_trip_and_oracle_agree(n: int, k: int, g: int) -> None:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k))
    bias = torch.randn(n).to(torch.float16)
    qt = QTensor.from_float(w, 4, g, zero_point=False, bias=bias, scale_dtype=torch.float16)
    parts = {**modelopt.pack(qt), "bias": bias}
    assert modelopt.unpack(parts, 4, g, "m").equal(qt)
    oracle = unpack_w4a16_awq(parts["weight"], parts["weight_scale"], k if g == -1 else g)  # fp32, exact
    assert torch.equal(oracle.to(qt.scale.dtype), qt.dequantize())


def test_pack_refuses_asymmetric_and_unpackable() -> None:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    asym = QTensor.from_float(w, 4, 32, zero_point=True)
    with pytest.raises(ConfigError, match=r"symmetric.*nvila-quant awq --no-zero-point.*nvila-quant rtn --no-zero"):
        modelopt.pack(asym)
    with pytest.raises(ConfigError, match="out_features must be even, got 7"):
        modelopt.check(4, 32, (7, 64))
    with pytest.raises(ConfigError, match=r"modelopt packs only \[4\]-bit weights, got bits=8"):
        modelopt.check(8, 32, (8, 64))
    with pytest.raises(ConfigError, match="group_size must divide in_features"):
        modelopt.check(4, 48, (8, 64))


def test_unpack_checks_shapes_and_pre_quant_scale() -> None:
    qt = QTensor.from_float(torch.randn(8, 64, generator=torch.Generator().manual_seed(1)), 4, 32, zero_point=False)
    parts = modelopt.pack(qt)
    with pytest.raises(CheckpointError, match=r"m.weight_scale \(N, K/G\) with N=8, K=64, G=32 has shape"):
        modelopt.unpack({**parts, "weight_scale": qt.scale.t().contiguous()}, 4, 32, "m")
    with pytest.raises(CheckpointError, match="2-D int8"):
        modelopt.unpack({**parts, "weight": parts["weight"].to(torch.int32)}, 4, 32, "m")
    with pytest.raises(CheckpointError, match="pre_quant_scale is not all ones"):
        modelopt.unpack({**parts, "pre_quant_scale": parts["pre_quant_scale"] * 2}, 4, 32, "m")
    with pytest.raises(CheckpointError, match="lacks tensor 'weight_scale'"):
        modelopt.unpack({"weight": parts["weight"]}, 4, 32, "m")


def test_hf_quant_config_block() -> None:
    assert modelopt.hf_quant_config(128, ["lm_head"], "v") == {
        "producer": {"name": "modelopt", "version": "v"},
        "quantization": {"quant_algo": "W4A16_AWQ", "group_size": 128, "has_zero_point": False,
                         "pre_quant_scale": True, "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]},
    }


# ---------------------------------------------------------------------------------------------- the export
def test_rtn_export_loads_in_trtllm(rtn_export, rtn_sym) -> None:
    out, manifest = rtn_export
    assert check_trtllm_checkpoint(out) == []
    assert _files(out) == sorted([
        "config.json", "hf_quant_config.json", MANIFEST_NAME,
        "llm/chat_template.jinja", "llm/config.json", "llm/generation_config.json", "llm/model.safetensors",
        "llm/model.safetensors.index.json", "llm/tokenizer.json", "llm/tokenizer_config.json",
        "mm_projector/config.json", "mm_projector/model.safetensors", "mm_projector/model.safetensors.index.json",
        "vision_tower/config.json", "vision_tower/model.safetensors", "vision_tower/preprocessor_config.json",
    ])
    assert json.loads((out / "hf_quant_config.json").read_text()) == modelopt.hf_quant_config(
        128, ["lm_head"], f"nvila-quant {__version__}")
    root = json.loads((out / "config.json").read_text())
    assert root["architectures"] == ["LlavaLlamaModel"] and root["model_type"] == "llava_llama"
    assert root["resume_path"] and root["model_dtype"] == "torch.bfloat16"
    assert [root[k]["_name_or_path"] for k in ("llm_cfg", "vision_tower_cfg", "mm_projector_cfg")] == [
        "./llm", "./vision_tower", "./mm_projector"]
    assert "quantization_config" not in root and "_name_or_path" not in root
    llm_cfg = json.loads((out / "llm/config.json").read_text())
    assert llm_cfg["model_max_length"] == 4096 and not {"quantization_config", "nvila_quant"} & set(llm_cfg)
    assert root["llm_cfg"] == {**llm_cfg, "_name_or_path": "./llm"}
    mp_cfg = json.loads((out / "mm_projector/config.json").read_text())
    assert not {"quantization_config", "nvila_quant", "scaled_activations"} & set(mp_cfg)
    for name in ("llm/tokenizer.json", "llm/tokenizer_config.json", "llm/chat_template.jinja",
                 "llm/generation_config.json", "vision_tower/model.safetensors", "vision_tower/config.json",
                 "vision_tower/preprocessor_config.json"):
        assert (out / name).read_bytes() == (rtn_sym / name).read_bytes(), name
    header = read_header(out / "llm/model.safetensors")
    pqs = sorted(k.removesuffix(".pre_quant_scale") for k in header if k.endswith(".pre_quant_scale"))
    assert pqs == sorted(f"model.layers.{i}.{m}" for i in range(4) for m in ("self_attn.o_proj", "mlp.down_proj"))
    assert all(header[f"{m}.pre_quant_scale"]["dtype"] == "BF16" for m in pqs)
    assert header["model.layers.0.self_attn.q_proj.bias"]["dtype"] == "BF16"
    assert manifest == json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["quantization"]["source_format"] == "autoawq" and manifest["llm"]["quantized_linears"] == 28
    assert manifest["llm"]["float_linears"] == ["lm_head"] and manifest["llm"]["pre_quant_scale"] == pqs
    assert manifest["mm_projector"] == "dequantized from autoawq" and manifest["vision_tower"] == "copied"
    assert manifest["notes"] == []


def test_export_weights_equal_the_runtime(rtn_export, rtn_sym) -> None:
    """The oracle's unpacking of every exported int4 linear equals our runtime's dequantized weight exactly; float
    tensors and the dequantized projector are the source's."""
    out, _ = rtn_export
    floats, qlinears, _ = read_quantized_submodel(rtn_sym / "llm")
    exported = dequantized_llm_weights(out)
    assert sorted(exported) == sorted(qlinears)
    for name, qt in qlinears.items():
        assert torch.equal(exported[name].to(qt.scale.dtype), qt.dequantize()), name
    llm = load_state_dict(out / "llm")
    assert all(torch.equal(llm[k], t) for k, t in floats.items())
    _, mp_q, _ = read_quantized_submodel(rtn_sym / "mm_projector")
    mp = load_state_dict(out / "mm_projector")
    assert all(torch.equal(mp[f"{n}.weight"], qt.dequantize()) for n, qt in mp_q.items())
    state, _ = float_projector_state(rtn_sym / "mm_projector", torch.bfloat16)
    assert mp.keys() == state.keys() and all(torch.equal(mp[k], state[k]) for k in state)


def test_symmetric_autoawq_repacks_bit_exactly(rtn_export, rtn_sym) -> None:
    """ModelOpt nibble = the AutoAWQ code q - 8 (read straight from the exported bytes), scales bit for bit."""
    out, _ = rtn_export
    _, qlinears, spec = read_quantized_submodel(rtn_sym / "llm")
    assert spec.format == "autoawq" and spec.symmetric
    src = load_state_dict(rtn_sym / "llm")
    llm = load_state_dict(out / "llm")
    for name, qt in qlinears.items():
        raw = llm[f"{name}.weight"].view(torch.uint8)  # (N/2, K)
        nibbles = torch.stack([raw & 15, raw >> 4], dim=1).reshape(qt.q.shape)
        assert torch.equal(nibbles, (qt.q.to(torch.int16) - 8).bitwise_and(15).to(torch.uint8)), name
        assert llm[f"{name}.weight_scale"].dtype == src[f"{name}.scales"].dtype
        assert torch.equal(llm[f"{name}.weight_scale"], src[f"{name}.scales"].t()), name  # AutoAWQ: (K/G, N)
        parts = {s: llm[f"{name}.{s}"] for s in modelopt.SUFFIXES if f"{name}.{s}" in llm}
        assert modelopt.unpack(parts, 4, 128, name).equal(qt), name


def test_asymmetric_is_refused_before_writing(tmp_path, tiny_nvila) -> None:
    asym = quantize(tiny_nvila, AWQConfig(method="rtn"), None, tmp_path / "asym", progress=False).output
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConfigError, match=r"zero points.*nvila-quant awq --no-zero-point"):
        write_trtllm(asym, out, progress=False)
    assert list(out.iterdir()) == []


def _edit_llm_quant(key: str, value: object) -> Callable[[dict], None]:
    def edit(cfg: dict) -> None:
        cfg["quantization_config"][key] = value
        cfg["nvila_quant"][key] = value

    return edit


@pytest.mark.parametrize("edit,message", [
    (_edit_llm_quant("bits", 8), "4-bit weights only, got bits=8"),
    (_edit_llm_quant("group_size", 32), "group size 64 or 128, got 32"),
    (lambda cfg: cfg["nvila_quant"].update(module_overrides={"model.layers.1.mlp.down_proj": {"group_size": 64}}),
     r"one group size per checkpoint, but layers use \[64, 128\]"),
], ids=["bits", "group-size", "mixed-group-sizes"])
def test_unservable_settings_are_refused_before_writing(tmp_path, rtn_sym, edit, message) -> None:
    src = tmp_path / "src"
    shutil.copytree(rtn_sym, src)
    cfg = json.loads((src / "llm/config.json").read_text())
    edit(cfg)
    (src / "llm/config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConfigError, match=message):
        write_trtllm(src, out, progress=False)
    assert list(out.iterdir()) == []


def test_float_source_is_a_float_trtllm_checkpoint(tmp_path, tiny_nvila) -> None:
    out, manifest = _export(tiny_nvila, tmp_path / "out")
    assert check_trtllm_checkpoint(out) == []
    assert not (out / "hf_quant_config.json").exists() and manifest["quantization"] is None
    assert manifest["mm_projector"] == "copied" and manifest["vision_tower"] == "copied"
    for sub in ("llm", "mm_projector", "vision_tower"):
        a, b = load_state_dict(tiny_nvila / sub), load_state_dict(out / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a), sub


def test_model_max_length_falls_back_to_tokenizer_then_positions(tmp_path, tiny_nvila) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_nvila, src)
    _edit_json("llm/config.json", lambda c: c.pop("model_max_length"))(src)
    _edit_json("llm/tokenizer_config.json", lambda c: c.update(model_max_length=2048))(src)
    out, manifest = _export(src, tmp_path / "a")
    assert (manifest["llm"]["model_max_length"], manifest["llm"]["model_max_length_from"]) == (
        2048, "llm/tokenizer_config.json")
    assert json.loads((out / "llm/config.json").read_text())["model_max_length"] == 2048
    _edit_json("llm/tokenizer_config.json", lambda c: c.update(model_max_length=int(1e30)))(src)  # HF's "unset"
    out, manifest = _export(src, tmp_path / "b")
    assert (manifest["llm"]["model_max_length"], manifest["llm"]["model_max_length_from"]) == (
        8192, "max_position_embeddings")
    assert check_trtllm_checkpoint(out, load_tokenizer=False) == []


def test_fp32_source_is_written_in_bf16(tmp_path, tiny_fp32) -> None:
    float_out, float_manifest = _export(tiny_fp32, tmp_path / "float")
    rtn = quantize(tiny_fp32, AWQConfig(method="rtn", zero_point=False), None, tmp_path / "rtn", progress=False)
    quant_out, quant_manifest = _export(rtn.output, tmp_path / "quant")
    for out, manifest in ((float_out, float_manifest), (quant_out, quant_manifest)):
        assert check_trtllm_checkpoint(out, load_tokenizer=False) == []
        assert manifest["source_dtype"] == "torch.float32" and manifest["model_dtype"] == "torch.bfloat16"
        assert len(manifest["notes"]) == 1 and "float32; written in bfloat16" in manifest["notes"][0]
        root = json.loads((out / "config.json").read_text())
        assert root["model_dtype"] == "torch.bfloat16"
        for sub in ("llm", "vision_tower", "mm_projector"):
            cfg = json.loads((out / sub / "config.json").read_text())
            assert [cfg[k] for k in ("dtype", "torch_dtype") if k in cfg] in (["bfloat16"], ["bfloat16"] * 2), sub
            floats = {k: v["dtype"] for k, v in read_header(out / sub / "model.safetensors").items()
                      if v["dtype"].startswith(("F", "BF")) and not k.endswith(".weight_scale")}
            assert set(floats.values()) == {"BF16"}, sub
    assert float_manifest["vision_tower"] == "cast to bfloat16" == float_manifest["mm_projector"]
    src = load_state_dict(tiny_fp32 / "llm")
    assert all(torch.equal(t, src[k].to(torch.bfloat16)) for k, t in load_state_dict(float_out / "llm").items())
    _, qlinears, _ = read_quantized_submodel(rtn.output / "llm")
    exported = dequantized_llm_weights(quant_out)
    assert all(torch.equal(exported[n].to(qt.scale.dtype), qt.dequantize()) for n, qt in qlinears.items())


@pytest.mark.slow
def test_awq_export_folds_the_projector_activation_scale(tmp_path, tiny_nvila) -> None:
    """A symmetric AWQ run (its projector has an activation scale, ``scaled_activations``) exports and loads."""
    config = AWQConfig(method="awq", zero_point=False, n_samples=1, text_ratio=0.0, seqlen=128, n_grid=4, clip=False)
    awq = quantize(tiny_nvila, config, "builtin", tmp_path / "awq", progress=False).output
    assert json.loads((awq / "mm_projector/config.json").read_text())["scaled_activations"] == ["layers.3"]
    out, _ = _export(awq, tmp_path / "out")
    assert check_trtllm_checkpoint(out) == []
    state, _ = float_projector_state(awq / "mm_projector", torch.bfloat16)
    mp = load_state_dict(out / "mm_projector")
    assert mp.keys() == state.keys() and all(torch.equal(mp[k], state[k]) for k in state)
    _, qlinears, _ = read_quantized_submodel(awq / "llm")
    exported = dequantized_llm_weights(out)
    assert all(torch.equal(exported[n].to(qt.scale.dtype), qt.dequantize()) for n, qt in qlinears.items())


# ---------------------------------------------------------------------------------------------- the oracle fails
def _edit_json(path: str, fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        data = json.loads((root / path).read_text())
        fn(data)
        (root / path).write_text(json.dumps(data))

    return mutate


def _edit_llm_tensors(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        path = root / "llm/model.safetensors"
        tensors = load_file(str(path))
        fn(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})
        index = root / "llm/model.safetensors.index.json"
        data = json.loads(index.read_text())
        data["weight_map"] = {k: path.name for k in tensors}
        index.write_text(json.dumps(data))

    return mutate


O_PROJ = "model.layers.0.self_attn.o_proj"
Q_PROJ = "model.layers.0.self_attn.q_proj"
MUTATIONS = {
    "drop o_proj pre_quant_scale": (_edit_llm_tensors(lambda t: t.pop(f"{O_PROJ}.pre_quant_scale")),
                                    rf"llm/ lacks {O_PROJ}.pre_quant_scale"),
    "missing model_max_length": (_edit_json("llm/config.json", lambda c: c.pop("model_max_length")),
                                 "no integer model_max_length"),
    "empty resume_path": (_edit_json("config.json", lambda c: c.update(resume_path="")), "resume_path '' is falsy"),
    "null resume_path": (_edit_json("config.json", lambda c: c.update(resume_path=None)), "resume_path None is falsy"),
    "fp32 model_dtype": (_edit_json("config.json", lambda c: c.update(model_dtype="torch.float32")),
                         "model_dtype 'torch.float32'"),
    "llm_cfg without _name_or_path": (_edit_json("config.json", lambda c: c["llm_cfg"].pop("_name_or_path")),
                                      "llm_cfg has no _name_or_path"),
    "has_zero_point": (_edit_json("hf_quant_config.json", lambda c: c["quantization"].update(has_zero_point=True)),
                       "has_zero_point is true"),
    "group size 32": (_edit_json("hf_quant_config.json", lambda c: c["quantization"].update(group_size=32)),
                      "group_size 32"),
    "no hf_quant_config": (lambda root: (root / "hf_quant_config.json").unlink(),
                           rf"{Q_PROJ}.weight is I8 \(128, 256\), expected one of \('F16', 'BF16', 'F32'\)"),
    "weight_scale transposed": (_edit_llm_tensors(lambda t: t.update({f"{O_PROJ}.weight_scale":
                                                                      t[f"{O_PROJ}.weight_scale"].t().contiguous()})),
                                rf"{O_PROJ}.weight_scale is BF16 \(2, 256\)"),
    "packed along the input dim": (_edit_llm_tensors(lambda t: t.update({f"{Q_PROJ}.weight": torch.zeros(
        256, 128, dtype=torch.int8)})), rf"{Q_PROJ}.weight is I8 \(256, 128\), expected one of \('I8', 'U8'\) "
                                        r"\(128, 256\)"),
    "fused pre_quant_scale not ones": (_edit_llm_tensors(lambda t: t.update({f"{Q_PROJ}.pre_quant_scale": torch.full(
        (256,), 2.0, dtype=torch.bfloat16)})), "not all ones, but the fused self_attn.qkv_proj load never applies it"),
    "projector activation scale": (_edit_json("mm_projector/config.json",
                                              lambda c: c.update(scaled_activations=["layers.3"])),
                                   "'scaled_activations'"),
    "missing tokenizer chat template": (lambda root: (root / "llm/chat_template.jinja").unlink(),
                                        "no usable chat template"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_oracle_catches_a_broken_export(tmp_path, rtn_export, name) -> None:
    out, _ = rtn_export
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    mutate, message = MUTATIONS[name]
    mutate(broken)
    problems = check_trtllm_checkpoint(broken, load_tokenizer=name == "missing tokenizer chat template")
    assert any(re.search(message, p) for p in problems), problems


def test_oracle_catches_a_wrong_nibble_order(tmp_path, rtn_export, rtn_sym) -> None:
    """Nibble order is a value property: the structure still loads, the oracle's weights no longer equal ours."""
    out, _ = rtn_export
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)

    def swap(t: dict[str, torch.Tensor]) -> None:
        raw = t[f"{Q_PROJ}.weight"].view(torch.uint8)
        t[f"{Q_PROJ}.weight"] = ((raw >> 4) | (raw << 4)).view(torch.int8)  # odd row low, even row high

    _edit_llm_tensors(swap)(broken)
    assert check_trtllm_checkpoint(broken, load_tokenizer=False) == []
    _, qlinears, _ = read_quantized_submodel(rtn_sym / "llm")
    exported = dequantized_llm_weights(broken)
    differ = [n for n, qt in qlinears.items() if not torch.equal(exported[n].to(qt.scale.dtype), qt.dequantize())]
    assert differ == [Q_PROJ]


def test_oracle_refuses_the_unconverted_autoawq_folder(rtn_sym) -> None:
    problems = check_trtllm_checkpoint(rtn_sym, load_tokenizer=False)
    assert any("quant_method 'rtn'" in p for p in problems)
    assert any(re.search(rf"{Q_PROJ} has AutoAWQ tensors", p) for p in problems)
    assert any("mm_projector/ lacks ['layers.2.weight', 'layers.4.weight']" in p for p in problems)
