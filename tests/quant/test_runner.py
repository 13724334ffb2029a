"""The AWQ pipeline end to end on tiny checkpoints with planted outliers: quality, output, options, errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from awq_helpers import TEST_CONFIG, default_awq, default_rtn

from nvila_quant.calibration import CalibrationError, build_samples, embed_samples, load_records
from nvila_quant.errors import ConfigError, OutputExistsError
from nvila_quant.formats.checkpoint import read_quantized_submodel
from nvila_quant.io import read_json
from nvila_quant.model import NVILAQwen2
from nvila_quant.numerics.qtensor import QTensor
from nvila_quant.paths import builtin_eval_dir
from nvila_quant.quant.config import AWQConfig
from nvila_quant.quant.evaluate import llm_logits, load_dequantized, next_token_metrics
from nvila_quant.quant.results import apply_awq_results
from nvila_quant.quant.runner import LayerPlan, plan_layers, quantize, work_dir_for


@pytest.fixture(scope="module")
def awq(tmp_path_factory, tiny_nvila):
    return default_awq(tmp_path_factory, tiny_nvila)


@pytest.fixture(scope="module")
def rtn(tmp_path_factory, tiny_nvila):
    return default_rtn(tmp_path_factory, tiny_nvila)


def test_awq_beats_rtn_on_every_block_and_group(awq):
    log = awq.log
    assert len(log["blocks"]) == 4
    for block in log["blocks"]:
        assert block["mse_awq"] < block["mse_rtn"], block["index"]
        # reference: no v->o on GQA
        assert [g["name"] for g in block["groups"]] == ["attn.qkv", "mlp.gate_up", "mlp.down"]
        for g in block["groups"]:
            # the grid's guarantees: ratio 0 is plain RTN (test_scales_and_grid_equal_reference), the first minimum wins
            assert len(g["losses"]) == 20 and g["rtn_loss"] == g["losses"][0]
            assert g["awq_loss"] == min(g["losses"]) and g["ratio"] == g["losses"].index(g["awq_loss"]) / 20
            # and what AWQ is for: on the planted outlier channels it finds a scale far better than RTN
            assert g["awq_loss"] < 0.5 * g["rtn_loss"], (block["index"], g["name"])
        assert set(block["clip"]) == {"self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                      "mlp.down_proj"}  # q/k never clipped
    proj = log["projector"]
    assert proj["mse_awq"] < proj["mse_rtn"]
    assert all(g["rtn_loss"] == g["losses"][0] and g["awq_loss"] == min(g["losses"]) < g["rtn_loss"]
               for g in proj["groups"])
    assert [(g["name"], g["prev_op"]) for g in proj["groups"]] == [("layers.2", "layers.1"), ("layers.4", "layers.3")]
    assert log["summary"]["blocks_awq_better"] == 4
    cal = log["calibration"]
    assert cal["image_samples"] == 2 and cal["text_samples"] == 2 and cal["visual_tokens"] > 0
    assert set(log["timings"]) >= {"calibration_s", "projector_s", "llm_s", "write_s", "total_s"}
    assert all("time_s" in b and b["time_s"]["total"] > 0 for b in log["blocks"])


def test_output_layout_loads_and_equals_reapplied_results(awq, tiny_nvila):
    out = awq.output
    assert not work_dir_for(out).exists()  # work folder removed after success
    for name in ("config.json", "quant_log.json", "awq_results.safetensors", "llm/tokenizer_config.json",
                 "llm/generation_config.json", "vision_tower/preprocessor_config.json"):
        assert (out / name).is_file(), name
    assert ((out / "vision_tower/model.safetensors").read_bytes()
            == (tiny_nvila / "vision_tower/model.safetensors").read_bytes())
    llm_cfg = read_json(out / "llm/config.json")
    assert (llm_cfg["quantization_config"]["quant_method"] == "awq"
            and llm_cfg["quantization_config"]["version"] == "gemm")
    mp_cfg = read_json(out / "mm_projector/config.json")
    assert mp_cfg["mm_projector_type"] == "mlp_downsample_2x2_fix" and mp_cfg["scaled_activations"] == ["layers.3"]
    root = read_json(out / "config.json")
    assert root["quantization_config"]["format"] == "autoawq" and root["llm_cfg"]["quantization_config"]
    assert read_json(out / "quant_log.json")["settings"]["bits"] == 4

    # re-applying awq_results to the float model and rounding to nearest reproduces every packed weight
    model = NVILAQwen2.load_pretrained(tiny_nvila, torch_dtype=torch.float32, device="cpu")
    apply_awq_results(model, out / "awq_results.safetensors")
    for sub, prefix in (("llm", "llm."), ("mm_projector", "mm_projector.")):
        floats, qlinears, spec = read_quantized_submodel(out / sub)
        assert len(qlinears) == (28 if sub == "llm" else 2)
        for name, qt in qlinears.items():
            lin = model.get_submodule(prefix + name)
            again = QTensor.from_float(lin.weight, qt.bits, qt.group_size, not qt.symmetric,
                                       bias=None if lin.bias is None else lin.bias.to(qt.scale.dtype),
                                       scale_dtype=qt.scale.dtype)
            assert again.equal(qt), name
        for key, t in floats.items():  # scaled norms and activation scales, in the checkpoint dtype
            if key.startswith("model.layers.") or sub == "mm_projector":
                assert torch.equal(model.get_parameter(prefix + key).to(t.dtype), t), key


def test_next_token_kl_vs_float_lower_than_rtn(awq, rtn, tiny_nvila):
    ref = NVILAQwen2.load_pretrained(tiny_nvila, torch_dtype=torch.float32, device="cpu")
    evalset = embed_samples(ref, build_samples(load_records(builtin_eval_dir()), 4, 0.5, seed=0), seqlen=3000,
                            capture_projector=False, progress=False)
    ref_logits = llm_logits(ref, evalset)
    metrics = {}
    for name, res in (("awq", awq), ("rtn", rtn)):
        model = load_dequantized(res.output, torch.float32, "cpu")
        metrics[name] = next_token_metrics(ref_logits, llm_logits(model, evalset), evalset)
    assert metrics["awq"]["kl"] < metrics["rtn"]["kl"], metrics
    assert metrics["awq"]["top1"] > metrics["rtn"]["top1"], metrics
    assert metrics["awq"]["tokens"] > 100


def test_options_run(tmp_path, tiny_nvila):
    """Duo scaling, ratio 1.0, GQA-aware v->o and quantized-input propagation, all at once."""
    cfg = AWQConfig(**{**TEST_CONFIG, "n_samples": 2}, duo_scaling=True, grid_include_one=True, gqa_vo=True,
                    quant_input=True, format="compressed-tensors", targets="llm")
    res = quantize(tiny_nvila, cfg, "builtin", tmp_path / "opt", progress=False)
    for block in res.log["blocks"]:
        names = [g["name"] for g in block["groups"]]
        assert names == ["attn.qkv", "attn.vo", "mlp.gate_up", "mlp.down"]
        vo = block["groups"][1]
        assert vo["awq_loss"] < vo["rtn_loss"] and len(vo["losses"]) == 21
        assert block["mse_awq"] < block["mse_rtn"]
    _, qlinears, spec = read_quantized_submodel(tmp_path / "opt" / "llm")
    assert spec.format == "compressed-tensors" and len(qlinears) == 28
    meta = json.loads(json.dumps(res.log["settings"]))
    assert meta["duo_scaling"] and meta["gqa_vo"] and meta["quant_input"]


def test_lite_projector_falls_back_per_layer(tmp_path, tiny_nvila_lite, caplog):
    """3x3 projector: 576 and 192 are not multiples of 128 -> group 64 with a warning; GELU -> Linear group."""
    cfg = AWQConfig(**{**TEST_CONFIG, "n_samples": 2}, targets="projector", format="tinychat")
    with caplog.at_level(logging.WARNING):
        res = quantize(tiny_nvila_lite, cfg, "builtin", tmp_path / "lite", progress=False)
    assert any("layers.2" in r.message and "using 64" in r.message for r in caplog.records)
    _, qlinears, spec = read_quantized_submodel(tmp_path / "lite" / "mm_projector")
    assert (spec.module_overrides == {"layers.2": 64, "layers.5": 64}
            and set(qlinears) == {"layers.2", "layers.5", "layers.7"})
    assert [g["prev_op"] for g in res.log["projector"]["groups"]] == ["layers.1", "layers.4", "layers.6"]
    assert read_json(tmp_path / "lite" / "mm_projector/config.json")["scaled_activations"] == ["layers.6"]
    assert "quantization_config" not in read_json(tmp_path / "lite" / "llm/config.json")  # llm not targeted
    assert res.log["projector"]["mse_awq"] < res.log["projector"]["mse_rtn"]


@pytest.mark.parametrize("fmt,bits,group,zp", [("compressed-tensors", 8, 64, False), ("tinychat", 4, 128, True)])
def test_rtn_formats(tmp_path, tiny_nvila, fmt, bits, group, zp):
    cfg = AWQConfig(method="rtn", format=fmt, bits=bits, group_size=group, zero_point=zp)
    res = quantize(tiny_nvila, cfg, None, tmp_path / "rtn", progress=False)
    ref = NVILAQwen2.load_pretrained(tiny_nvila, torch_dtype=torch.float32, device="cpu")
    _, qlinears, spec = read_quantized_submodel(res.output / "llm")
    assert (spec.format, spec.bits, spec.symmetric) == (fmt, bits, not zp)
    w = ref.get_submodule("llm.model.layers.0.mlp.down_proj").weight
    assert qlinears["model.layers.0.mlp.down_proj"].equal(
        QTensor.from_float(w, bits, group, zp, scale_dtype=torch.bfloat16))
    assert "blocks" in res.log and "mse_rtn" not in res.log["blocks"][0]  # no calibration, no error log


def test_refuses_existing_output_and_unfinished_work(tmp_path, tiny_nvila):
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        quantize(tiny_nvila, AWQConfig(method="rtn"), None, out, progress=False)
    out.rmdir()
    work_dir_for(out).mkdir()
    with pytest.raises(OutputExistsError, match="pass --resume"):
        quantize(tiny_nvila, AWQConfig(method="rtn"), None, out, progress=False)


def test_bad_inputs_fail_before_any_work(tmp_path, tiny_nvila):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=r"autoawq packs only \[4\]-bit weights, got --w-bit 3; "
                                          r"use --format compressed-tensors"):
        quantize(tiny_nvila, AWQConfig(bits=3), "builtin", out)
    with pytest.raises(ConfigError, match="needs image samples"):
        quantize(tiny_nvila, AWQConfig(text_ratio=1.0), "builtin", out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "missing.jpg", "text": "x"}\n')
    with pytest.raises(CalibrationError, match="image file not found"):
        quantize(tiny_nvila, AWQConfig(), bad, out)
    bad.write_text("")
    with pytest.raises(CalibrationError, match="holds no samples"):
        quantize(tiny_nvila, AWQConfig(), bad, out)
    assert not out.exists() and not work_dir_for(out).exists()


def test_group_size_dividing_no_layer_is_an_error(tmp_path):
    from nvila_quant.model.config import load_config
    from nvila_quant.testing.factory import TinySpec, make_tiny

    odd = make_tiny(tmp_path / "odd", TinySpec(llm_hidden=96, llm_intermediate=200, llm_heads=4, llm_kv_heads=2))
    with pytest.raises(ConfigError, match=r"group size 128 divides the input width of none of the 7 target linears"):
        plan_layers(load_config(odd), AWQConfig(targets="llm"))
    plan = plan_layers(load_config(odd), AWQConfig(targets="llm", group_size=32))  # 96 = 3 x 32; 200 -> per channel
    assert isinstance(plan, LayerPlan) and plan.llm["mlp.down_proj"].group_size == -1
    assert plan.llm["self_attn.q_proj"].group_size == 32 and any("mlp.down_proj" in n for n in plan.notes)
    three = plan_layers(load_config(odd), AWQConfig(targets="llm", group_size=32, bits=3, format="compressed-tensors"))
    assert three.llm["self_attn.q_proj"].bits == 3
