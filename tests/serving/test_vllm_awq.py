"""``OUT/llm`` as vLLM sees it (oracles ``serving.marlin`` / ``serving.vllm_rules``) and as a real CPU client loads
it: transformers 5 routes ``quant_method: awq`` through gptqmodel."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from serving.marlin import MIN_SM, check_awq_marlin
from serving.vllm_rules import check_vllm_llm_folder

from nvila_quant.kernels.linear import QuantLinear
from nvila_quant.model.quantized import load_quantized_llm
from nvila_quant.quant.config import AWQConfig
from nvila_quant.quant.runner import quantize
from nvila_quant.testing.factory import TinySpec, make_tiny

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
CLIENT = Path(__file__).with_name("gptqmodel_client.py")
PROMPTS = ["The cat sat on the mat.", "Describe the picture in one sentence.", "A rocket lifts off at dawn"]


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def outputs(tiny_nvila: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny NVILA quantized (RTN, group 128, zero points) into each format vLLM reads: {format: OUT}."""
    root = tmp_path_factory.mktemp("serving")
    return {fmt: quantize(tiny_nvila, AWQConfig(method="rtn", format=fmt), calib=None, output=root / fmt,
                          progress=False).output
            for fmt in ("autoawq", "compressed-tensors")}


def _mutated(llm: Path, dst: Path, edit) -> Path:
    """A copy of ``llm`` whose config.json's quantization_config went through ``edit(qc)`` (in place)."""
    shutil.copytree(llm, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config["quantization_config"])
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


# ---------------------------------------------------------------------------- marlin.py on synthetic configs
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
def test_marlin_takes_uint4_zero_point_groups(group_size: int) -> None:
    assert check_awq_marlin({**AWQ, "group_size": group_size}, {}, sm=80, min_sm=MIN_SM["vllm"]) == []


@pytest.mark.parametrize(("change", "needle"), [
    ({"quant_method": "gptq"}, "not 'awq'"),
    ({"quant_method": "AWQ"}, None),  # vLLM lower-cases the method
    ({"group_size": 256}, "group_size 256"),
    ({"group_size": 16}, "group_size 16"),
    ({"zero_point": False}, "zero points only"),
    ({"bits": 8}, "zero points only"),
    ({"bits": None}, "lacks ['bits']"),
    ({"group_size": None}, "lacks ['group_size']"),
    ({"zero_point": None}, "lacks ['zero_point']"),
])
def test_marlin_config_rules(change: dict, needle: str | None) -> None:
    config = {k: v for k, v in {**AWQ, **change}.items() if v is not None}
    reasons = check_awq_marlin(config, {}, sm=90, min_sm=MIN_SM["vllm"])
    assert (reasons == []) if needle is None else any(needle in r for r in reasons), reasons


def test_marlin_min_sm_per_engine() -> None:
    """sm75 (T4) gets marlin in vLLM, not in SGLang (sm80+)."""
    assert check_awq_marlin(AWQ, {}, sm=75, min_sm=MIN_SM["vllm"]) == []
    assert check_awq_marlin(AWQ, {}, sm=75, min_sm=MIN_SM["sglang"]) == ["GPU sm75 is below marlin's minimum sm80"]


def test_marlin_shapes_split_by_tensor_parallel() -> None:
    """NVILA-8B's LLM (Qwen2-7B: hidden 3584, intermediate 18944): column layers split N, o_proj / down_proj K."""
    shapes = {"model.layers.0.self_attn.qkv_proj": (4608, 3584), "model.layers.0.self_attn.o_proj": (3584, 3584),
              "model.layers.0.mlp.gate_up_proj": (37888, 3584), "model.layers.0.mlp.down_proj": (3584, 18944)}
    for tp in (1, 2, 4):
        assert check_awq_marlin(AWQ, shapes, sm=80, min_sm=75, tp=tp) == [], tp
    reasons = check_awq_marlin(AWQ, shapes, sm=80, min_sm=75, tp=8)  # K/8: 448 and 2368, not multiples of 128
    assert [r.split(":")[0] for r in reasons if "not a multiple of 128" in r] == [
        "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"]
    assert all("plain awq fallback" in r for r in reasons)


def test_marlin_n_rule_reports_the_layer() -> None:
    reasons = check_awq_marlin(AWQ, {"a.q_proj": (256, 256), "a.o_proj": (256, 256)}, sm=80, min_sm=75, tp=8)
    assert reasons == ["a.q_proj: N per partition 32 (N=256, tp=8) is not a multiple of 64 -> plain awq fallback",
                       "a.o_proj: K per partition 32 (K=256, tp=8) is not a multiple of 128 -> plain awq fallback",
                       "a.o_proj: K per partition 32 is not a multiple of group_size 128 -> plain awq fallback, "
                       "which needs it too (ValueError at load)"]
    # per-channel (-1) has no group rule; K=384 is a multiple of 128
    assert check_awq_marlin({**AWQ, "group_size": -1}, {"a.down_proj": (128, 384)}, sm=80, min_sm=75) == []


# ---------------------------------------------------------------------------- vllm_rules.py on our outputs
@pytest.mark.parametrize("fmt", ["autoawq", "compressed-tensors"])
def test_vllm_accepts_our_llm_folder(outputs: dict[str, Path], fmt: str) -> None:
    assert check_vllm_llm_folder(outputs[fmt] / "llm", sm=80) == []
    assert check_vllm_llm_folder(outputs[fmt] / "llm", sm=75) == []  # vLLM's marlin floor


def test_vllm_detection_order(outputs: dict[str, Path], tmp_path: Path) -> None:
    """quantization_config, then compression_config, then text_config's: a folder without any loads as floats."""
    llm = tmp_path / "llm"
    shutil.copytree(outputs["autoawq"] / "llm", llm)
    config = json.loads((llm / "config.json").read_text())
    qc = config.pop("quantization_config")
    for placed, problems in (({"compression_config": qc}, []), ({"text_config": {"quantization_config": qc}}, []),
                             ({}, ["no quantization_config / compression_config: vLLM would build float layers"])):
        (llm / "config.json").write_text(json.dumps({**config, **placed}))
        assert check_vllm_llm_folder(llm) == problems, placed


def test_vllm_rebuilds_an_empty_skip_list_from_dtypes(outputs: dict[str, Path], tmp_path: Path) -> None:
    """``maybe_update_config``: float-only layers (lm_head, embeddings, norms) become the skip list."""
    llm = _mutated(outputs["autoawq"] / "llm", tmp_path / "llm", lambda qc: qc.update(modules_to_not_convert=[]))
    assert check_vllm_llm_folder(llm) == []


def test_vllm_skip_list_is_a_substring_match(outputs: dict[str, Path], tmp_path: Path) -> None:
    """"down_proj" in modules_to_not_convert skips every layer's down_proj, which the checkpoint stores quantized."""
    llm = _mutated(outputs["autoawq"] / "llm", tmp_path / "llm",
                   lambda qc: qc.update(modules_to_not_convert=["lm_head", "down_proj"]))
    reasons = check_vllm_llm_folder(llm)
    assert len(reasons) == 4 and all(".mlp.down_proj: stored quantized" in r for r in reasons), reasons


def test_vllm_group_size_256_is_not_marlin(outputs: dict[str, Path], tmp_path: Path) -> None:
    llm = _mutated(outputs["autoawq"] / "llm", tmp_path / "llm", lambda qc: qc.update(group_size=256))
    reasons = check_vllm_llm_folder(llm)
    assert "not awq_marlin (group_size 256 not in marlin's [-1, 32, 64, 128])" in reasons
    assert any("plain awq runs fp16 activations only" in r for r in reasons)  # the model is bf16


def test_vllm_missing_zero_point_is_not_marlin(outputs: dict[str, Path], tmp_path: Path) -> None:
    llm = _mutated(outputs["autoawq"] / "llm", tmp_path / "llm", lambda qc: qc.pop("zero_point"))
    assert any("lacks ['zero_point']" in r for r in check_vllm_llm_folder(llm))


def test_vllm_quantized_lm_head_needs_lm_head_true(outputs: dict[str, Path], tmp_path: Path) -> None:
    """An lm_head stored as qweight/qzeros/scales loads only when quantization_config says ``"lm_head": true``."""
    llm = tmp_path / "llm"
    shutil.copytree(outputs["autoawq"] / "llm", llm)
    tensors = load_file(llm / "model.safetensors")
    vocab, hidden = tensors.pop("lm_head.weight").shape
    tensors |= {"lm_head.qweight": torch.zeros(hidden, vocab // 8, dtype=torch.int32),
                "lm_head.qzeros": torch.zeros(hidden // 128, vocab // 8, dtype=torch.int32),
                "lm_head.scales": torch.ones(hidden // 128, vocab, dtype=torch.bfloat16)}
    save_file(tensors, llm / "model.safetensors", metadata={"format": "pt"})
    index = json.loads((llm / "model.safetensors.index.json").read_text())
    index["weight_map"] = dict.fromkeys(tensors, "model.safetensors")
    (llm / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((llm / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"] = []
    config["nvila_quant"]["quantized_modules"].append("lm_head")
    (llm / "config.json").write_text(json.dumps(config))

    reasons = check_vllm_llm_folder(llm)
    assert any(r.startswith("lm_head: stored quantized but vLLM builds it unquantized") for r in reasons), reasons
    config["quantization_config"]["lm_head"] = True
    (llm / "config.json").write_text(json.dumps(config))
    reasons = check_vllm_llm_folder(llm)
    assert not any("stored quantized" in r for r in reasons), reasons


def test_vllm_reports_per_layer_fallback_at_tp2(tmp_path: Path) -> None:
    """intermediate 160, group 32: gate_up_proj's N per partition at tp=2 is 160 (not a multiple of 64)."""
    src = make_tiny(tmp_path / "tiny", TinySpec(llm_intermediate=160, llm_layers=2, outliers=False))
    out = quantize(src, AWQConfig(method="rtn", format="autoawq", group_size=32, targets=("llm",)), calib=None,
                   output=tmp_path / "out", progress=False).output
    n_rule = "mlp.gate_up_proj: N per partition 160 (N=320, tp=2) is not a multiple of 64 -> plain awq fallback"
    reasons = check_vllm_llm_folder(out / "llm", tp=2)
    assert [r for r in reasons if "gate_up_proj" in r] == [f"model.layers.{i}.{n_rule}" for i in range(2)], reasons
    assert not any("gate_up_proj" in r for r in check_vllm_llm_folder(out / "llm", tp=1))


# ---------------------------------------------------------------------------- the real client
@pytest.mark.slow  # ~15 s, most of it importing gptqmodel
@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                    reason="transformers 5 loads quant_method 'awq' through gptqmodel, which is not installed "
                           "(pip install -e '.[serving]')")
def test_transformers_gptqmodel_loads_our_awq_llm(tiny_nvila: Path, outputs: dict[str, Path], tmp_path: Path) -> None:
    """transformers + gptqmodel read exactly our codes, zeros and scales, and their CPU kernel's logits match ours.

    gptqmodel's CPU AWQ kernel (TorchAtenAwqLinear: ``aten._weight_int4pack_mm_for_cpu``) computes in bf16 whatever
    dtype the model is loaded in: activations go in as bf16 and the zero point is folded into a bf16 offset
    ``(8 - z) * s``. So the packing is checked bit-exactly on the dequantized weights, and the logits (both models
    loaded in fp32, ours with exact fp32 dequantization) are held to bf16 rounding: 8 bf16 ulps (2^-8 relative) of
    the largest logit (seen: under 1%), a bound that must sit well below the 4-bit quantization error it is meant
    to tell apart (seen: 70-90% of the largest logit on this tiny model).
    """
    from transformers import AutoModelForCausalLM

    llm, result = outputs["autoawq"] / "llm", tmp_path / "client.safetensors"
    run = subprocess.run([sys.executable, str(CLIENT), str(llm), str(result), *PROMPTS], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    theirs = load_file(result)
    with safe_open(result, framework="pt") as f:
        meta = f.metadata()

    ours = load_quantized_llm(llm, torch.float32, "cpu")
    packed = {name: m for name, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert len(packed) == 7 * ours.config.num_hidden_layers
    assert set(json.loads(meta["kernels"])) == set(packed)
    assert meta["lm_head"] == "Linear"  # kept float ("lm_head" in modules_to_not_convert)
    for name, module in packed.items():
        assert torch.equal(theirs[f"weight.{name}"], module.dequantize_weight(torch.float32)), name
        module.backend = "reference"

    float_llm = AutoModelForCausalLM.from_pretrained(tiny_nvila / "llm", dtype=torch.float32)  # before quantization
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            ids, got = theirs[f"ids.{i}"], theirs[f"logits.{i}"]
            ref, unq = ours(ids).logits, float_llm(ids).logits
            tol = 8 * 2**-8 * ref.abs().max()
            assert (got - ref).abs().max() <= tol, (prompt, (got - ref).abs().max(), tol)
            assert (unq - ref).abs().max() > 4 * tol, "tolerance too loose to tell the 4-bit weights apart"
            assert torch.equal(got[0, -1].argmax(), ref[0, -1].argmax()), prompt
