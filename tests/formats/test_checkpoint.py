"""QuantizedCheckpointWriter + read_quantized_submodel: shards, metadata, overrides and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nvila_quant.errors import CheckpointError, ConfigError
from nvila_quant.formats import (
    FORMATS,
    QTensor,
    QuantizedCheckpointWriter,
    detect_format,
    read_quantized_submodel,
)
from nvila_quant.io import INDEX_NAME, SINGLE_NAME

LINEARS = {  # name -> (N, K, group size; None = the writer's default)
    "model.layers.0.self_attn.q_proj": (64, 128, None),
    "model.layers.0.mlp.down_proj": (64, 192, 64),  # 192 is not a multiple of 128: per-layer fallback
    "model.layers.1.self_attn.q_proj": (128, 128, None),
}


def _write(folder: Path, fmt: str, symmetric: bool = False, max_shard_bytes: int = 2 * 1024**3,
           group_size: int = 128) -> tuple[dict[str, torch.Tensor], dict[str, QTensor]]:
    gen = torch.Generator().manual_seed(0)
    floats = {"model.embed_tokens.weight": torch.randn(50, 64, generator=gen).bfloat16(),
              "model.norm.weight": torch.ones(64, dtype=torch.bfloat16),
              "model.layers.1.input_layernorm.weight": torch.ones(128, dtype=torch.bfloat16)}
    qts = {}
    for name, (n, k, g) in LINEARS.items():
        w = torch.randn(n, k, generator=gen)
        bias = torch.randn(n, generator=gen).bfloat16() if "q_proj" in name else None
        qts[name] = QTensor.from_float(w, 4, g or group_size, not symmetric, bias=bias, scale_dtype=torch.bfloat16)
    writer = QuantizedCheckpointWriter(folder, fmt, 4, group_size, symmetric, max_shard_bytes=max_shard_bytes)
    for name, t in floats.items():
        writer.add_tensor(name, t)
    for name, qt in qts.items():
        writer.add_linear(name, qt)
    writer.finish({"model_type": "qwen2", "hidden_size": 64, "quantization_config": {"stale": True}}, ["lm_head"])
    return floats, qts


@pytest.mark.parametrize("fmt", FORMATS)
def test_writer_reader_roundtrip_with_shards(tmp_path: Path, fmt: str) -> None:
    floats, qts = _write(tmp_path / fmt, fmt, max_shard_bytes=8 * 1024)
    folder = tmp_path / fmt
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not list(folder.glob("*.tmp"))
    index = json.loads((folder / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    got_floats, got_q, spec = read_quantized_submodel(folder)
    assert set(got_floats) == set(floats) and all(torch.equal(got_floats[k], v) for k, v in floats.items())
    assert set(got_q) == set(qts) and all(got_q[k].equal(v) for k, v in qts.items())
    assert (spec.format, spec.bits, spec.group_size, spec.symmetric) == (fmt, 4, 128, False)
    assert spec.module_overrides == {"model.layers.0.mlp.down_proj": 64}
    config = json.loads((folder / "config.json").read_text())
    assert detect_format(config) == fmt and config["hidden_size"] == 64
    assert config["nvila_quant"]["module_overrides"] == {"model.layers.0.mlp.down_proj": {"group_size": 64}}


def test_single_shard_and_name_filter(tmp_path: Path) -> None:
    _, qts = _write(tmp_path, "autoawq", symmetric=True)
    assert (tmp_path / SINGLE_NAME).is_file() and (tmp_path / INDEX_NAME).is_file()
    floats, got, spec = read_quantized_submodel(tmp_path, names=["model.layers.1"])
    assert set(got) == {"model.layers.1.self_attn.q_proj"} and set(floats) == {"model.layers.1.input_layernorm.weight"}
    assert spec.symmetric and got["model.layers.1.self_attn.q_proj"].equal(qts["model.layers.1.self_attn.q_proj"])
    with pytest.raises(CheckpointError, match="no tensors or modules named"):
        read_quantized_submodel(tmp_path, names=["model.layers.7"])


def test_standard_quantization_configs(tmp_path: Path) -> None:
    _write(tmp_path / "a", "autoawq")
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": ["lm_head"]}
    _write(tmp_path / "c", "compressed-tensors", symmetric=True)
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    g0, g1 = qc["config_groups"]["group_0"], qc["config_groups"]["group_1"]
    assert g0["targets"] == ["Linear"] and g0["weights"]["group_size"] == 128 and g0["weights"]["symmetric"]
    assert g0["weights"]["strategy"] == "group" and g0["weights"]["type"] == "int" and g0["weights"]["num_bits"] == 4
    assert g1["targets"] == ["model.layers.0.mlp.down_proj"] and g1["weights"]["group_size"] == 64
    _write(tmp_path / "t", "tinychat")
    qc = json.loads((tmp_path / "t" / "config.json").read_text())["quantization_config"]
    assert qc["version"] == "gemv_fast" and qc["quant_method"] == "awq"


def test_third_party_config_without_our_metadata(tmp_path: Path) -> None:
    """An AutoAWQ / llm-compressor folder has only quantization_config: the reader still works."""
    for fmt in ("autoawq", "compressed-tensors"):
        folder = tmp_path / fmt
        _, qts = _write(folder, fmt)
        cfg = json.loads((folder / "config.json").read_text())
        cfg.pop("nvila_quant")
        (folder / "config.json").write_text(json.dumps(cfg))
        if fmt == "autoawq":  # AutoAWQ cannot express the override: the reader reports the disagreement
            with pytest.raises(CheckpointError, match="down_proj: metadata group_size=128 does not fit qweight"):
                read_quantized_submodel(folder)
            continue
        _, got, spec = read_quantized_submodel(folder)
        assert all(got[k].equal(v) for k, v in qts.items()) and spec.quantized_modules == sorted(qts)


def test_detect_format() -> None:
    assert detect_format({"model_type": "qwen2"}) is None
    assert detect_format({"quantization_config": {"quant_method": "awq", "bits": 4}}) == "autoawq"
    assert detect_format({"quant_method": "awq", "version": "gemv_fast"}) == "tinychat"
    assert detect_format({"quantization_config": {"quant_method": "compressed-tensors",
                                                  "format": "pack-quantized"}}) == "compressed-tensors"
    with pytest.raises(ConfigError, match="'gptq' is not supported"):
        detect_format({"quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(ConfigError, match="'gemv' is not supported"):
        detect_format({"quantization_config": {"quant_method": "awq", "version": "gemv"}})
    with pytest.raises(ConfigError, match="float-quantized"):
        detect_format({"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized"}})


def test_writer_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"only \[4\]-bit"):
        QuantizedCheckpointWriter(tmp_path, "autoawq", 8, 128, False)
    with pytest.raises(ConfigError, match="unknown quantized checkpoint format"):
        QuantizedCheckpointWriter(tmp_path, "awq", 4, 128, False)
    w = QuantizedCheckpointWriter(tmp_path, "autoawq", 4, 128, False)
    with pytest.raises(ConfigError,
                       match=r"layers.0.q: autoawq: group_size must divide in_features \(got in_features=192"):
        _bad_group(w)
    with pytest.raises(ConfigError,
                       match="writer holds bits=4, symmetric=False, got a QTensor with bits=4, symmetric=True"):
        w.add_linear("x", QTensor.from_float(torch.randn(8, 128), 4, 128, zero_point=False))
    w.add_tensor("a", torch.ones(2))
    with pytest.raises(ValueError, match="already written"):
        w.add_tensor("a", torch.ones(2))
    with pytest.raises(ConfigError, match="multiple of 8, got 12"):
        w.add_linear("odd", QTensor.from_float(torch.randn(12, 128), 4, 128))


def _bad_group(w: QuantizedCheckpointWriter) -> None:
    qt = QTensor(torch.zeros(8, 192, dtype=torch.uint8), torch.ones(8, 3), torch.zeros(8, 3, dtype=torch.int32), 4, 64)
    qt.group_size = 128  # bypass QTensor's own check to reach the writer's
    w.add_linear("layers.0.q", qt)


@pytest.mark.parametrize("fmt,drop,match", [
    ("autoawq", "qzeros", "lacks 'qzeros'"),
    ("compressed-tensors", "weight_zero_point", "lacks 'weight_zero_point'"),
    ("tinychat", "scaled_zeros", "lacks tensor 'scaled_zeros'"),
])
def test_bad_checkpoints_missing_tensor(tmp_path: Path, fmt: str, drop: str, match: str) -> None:
    from safetensors.torch import load_file, save_file

    _write(tmp_path, fmt)
    path = tmp_path / SINGLE_NAME
    state = load_file(str(path))
    state = {k: v for k, v in state.items() if not k.endswith(f"layers.0.self_attn.q_proj.{drop}")}
    save_file(state, str(path))
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in state}
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=match):
        read_quantized_submodel(tmp_path)


def test_bad_checkpoints_metadata_disagrees(tmp_path: Path) -> None:
    _write(tmp_path, "autoawq")
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    bad = {**cfg, "nvila_quant": {**cfg["nvila_quant"],
                                  "quantized_modules": [*cfg["nvila_quant"]["quantized_modules"], "lm_head"]}}
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=r"no 'qweight' for \['lm_head'\]"):
        read_quantized_submodel(tmp_path)
    bad = {**cfg, "quantization_config": {**cfg["quantization_config"], "group_size": 64}}
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="disagrees with quantization_config"):
        read_quantized_submodel(tmp_path)
    bad = {**cfg, "quantization_config": {**cfg["quantization_config"], "version": "gemv_fast"}}
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="metadata says format 'autoawq' but quantization_config says 'tinychat'"):
        read_quantized_submodel(tmp_path)
    cfg_path.write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantization_config"}))
    with pytest.raises(CheckpointError, match="no quantization_config"):
        read_quantized_submodel(tmp_path)


def test_activation_ordered_checkpoints_are_refused(tmp_path: Path) -> None:
    """llm-compressor GPTQ with actorder "group" / "weight" stores weight_g_idx (columns in non-sequential groups):
    refused by name, from the config or from the tensor, never loaded as if the groups were sequential."""
    from safetensors.torch import load_file, save_file

    _write(tmp_path, "compressed-tensors")
    cfg_path = tmp_path / "config.json"
    cfg = {k: v for k, v in json.loads(cfg_path.read_text()).items() if k != "nvila_quant"}  # as upstream writes it
    group = cfg["quantization_config"]["config_groups"]["group_0"]
    for actorder in ("group", "weight"):
        group["weights"]["actorder"] = actorder
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=f"actorder='{actorder}'.*weight_g_idx"):
            read_quantized_submodel(tmp_path)
    group["weights"]["actorder"] = "static"  # groups stay in column order: loads
    cfg_path.write_text(json.dumps(cfg))
    assert read_quantized_submodel(tmp_path)[1]
    path = tmp_path / SINGLE_NAME
    state = load_file(str(path))
    key = "model.layers.0.self_attn.q_proj.weight_g_idx"
    state[key] = torch.arange(128, dtype=torch.int32) // 128
    save_file(state, str(path))
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    index["weight_map"][key] = SINGLE_NAME
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="weight_g_idx' is a per-column group index"):
        read_quantized_submodel(tmp_path)
