"""Every command takes a flat -hf checkpoint, with the same results as the same weights in three folders."""

from __future__ import annotations

import json

import pytest

from nvila_quant.cli import export_main, main
from nvila_quant.formats.checkpoint import read_quantized_submodel
from nvila_quant.io import read_json
from nvila_quant.model.config import load_config
from nvila_quant.paths import builtin_calib_dir


def _generate(model, capsys) -> str:
    image = str(builtin_calib_dir() / "coffee.jpg")
    assert main(["generate", "--model", str(model), "--image", image, "--prompt", "Describe.", "--max-new-tokens", "6",
                 "--dtype", "fp32", "--device", "cpu"]) == 0
    return capsys.readouterr().out.strip()


def test_info_generate_convert(tiny_nvila, tiny_nvila_hf, tmp_path, capsys):
    assert main(["info", str(tiny_nvila_hf)]) == 0
    text = capsys.readouterr().out
    assert "flat -hf layout" in text and "NVILAForConditionalGeneration" in text
    assert main(["info", str(tiny_nvila_hf), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "hf" and info["submodels"]["llm"]["folder"] == "llm.*"
    assert info["submodels"]["vision_tower"]["tensors"] == json.loads(_info(tiny_nvila, capsys))[
        "submodels"]["vision_tower"]["tensors"]

    assert _generate(tiny_nvila_hf, capsys) == _generate(tiny_nvila, capsys)

    out = tmp_path / "back"
    assert main(["convert", "--model", str(tiny_nvila_hf), "--output", str(out), "--to", "vila", "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out and load_config(out).layout == "vila"
    assert main(["convert", "--model", str(tiny_nvila_hf), "--output", str(out), "--to", "vila"]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", "--model", str(tiny_nvila_hf), "--output", str(tmp_path / "x"), "--to", "sglang"])


def _info(model, capsys) -> str:
    assert main(["info", str(model), "--json"]) == 0
    return capsys.readouterr().out


def test_awq_on_hf_equals_awq_on_three_folders(tiny_nvila, tiny_nvila_hf, tmp_path, capsys):
    """The same calibration through the -hf runtime gives the same searched scales and int4 codes."""
    flags = ["--n-samples", "2", "--seqlen", "96", "--quiet", "--dtype", "fp32"]
    ref, hf = tmp_path / "ref", tmp_path / "hf"
    assert main(["awq", "--model", str(tiny_nvila), "--output", str(ref), *flags]) == 0
    assert main(["awq", "--model", str(tiny_nvila_hf), "--output", str(hf), *flags]) == 0
    capsys.readouterr()
    assert load_config(hf).layout == "hf"  # the input's layout by default
    _, q_ref, _ = read_quantized_submodel(ref / "llm")
    _, q_hf, _ = read_quantized_submodel(load_config(hf).part("llm"))
    assert q_ref.keys() == q_hf.keys() and all(q_ref[k].equal(q_hf[k]) for k in q_ref)
    assert read_json(hf / "quant_log.json")["method"] == "awq"

    report = tmp_path / "report"
    assert main(["compare", "--reference", str(tiny_nvila_hf), "--candidate", str(hf), "--output", str(report),
                 "--no-speed", "--generations", "1", "--max-new-tokens", "4", "--dtype", "fp32", "--device",
                 "cpu"]) == 0
    capsys.readouterr()
    assert (report / "report.json").is_file()


def test_rtn_layouts_and_onnx_export(tiny_nvila, tiny_nvila_hf, tmp_path, capsys):
    to_hf = tmp_path / "to-hf"
    assert main(["rtn", "--model", str(tiny_nvila), "--output", str(to_hf), "--layout", "hf", "--quiet"]) == 0
    to_vila = tmp_path / "to-vila"
    assert main(["rtn", "--model", str(tiny_nvila_hf), "--output", str(to_vila), "--layout", "vila", "--quiet"]) == 0
    capsys.readouterr()
    assert load_config(to_hf).layout == "hf" and load_config(to_vila).layout == "vila"
    _, a, _ = read_quantized_submodel(load_config(to_hf).part("llm"))
    _, b, _ = read_quantized_submodel(to_vila / "llm")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)

    outs = {}
    for name, model in (("vila", tiny_nvila), ("hf", tiny_nvila_hf)):
        out = tmp_path / f"onnx-{name}"
        assert export_main(["onnx", "--model", str(model), "--output", str(out), "--no-verify", "--no-optimize",
                            "--max-tiles", "4"]) == 0
        outs[name] = json.loads((out / "export.json").read_text())
    capsys.readouterr()
    assert outs["hf"]["vision"] == outs["vila"]["vision"]
    assert outs["hf"]["source"]["vision_weight_bytes"] == outs["vila"]["source"]["vision_weight_bytes"]
