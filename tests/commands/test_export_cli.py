"""`nvila-export onnx` command line: success path, and one-line errors with exit status 2."""

from __future__ import annotations

import json

import pytest

from nvila_quant.cli import build_parser
from nvila_quant.cli import export_main as main


def test_cli_help_documents_every_flag():
    sub = next(a for a in build_parser("nvila-export")._actions if a.dest == "command")
    onnx_parser = sub.choices["onnx"]
    flags = [a for a in onnx_parser._actions if a.option_strings and a.dest != "help"]
    assert {f.dest for f in flags} >= {"model", "output", "opset", "dtype", "include_projector", "max_tiles",
                                       "optimize", "verify", "overwrite"}
    assert all(f.help for f in flags)


def test_cli_export_no_verify_no_optimize(tiny_nvila_lite, tmp_path, capsys):
    from nvila_quant.model.onnx_vision import OnnxVisionGraphs

    out = tmp_path / "lite"
    assert main(["onnx", "--model", str(tiny_nvila_lite), "--output", str(out), "--no-verify", "--max-tiles", "4",
                 "--no-optimize"]) == 0
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["verification"] is None and manifest["max_tiles"] == 4 and manifest["graphs"]["projector"] is None
    assert manifest["optimized"] is None and not (out / "vision_tower.ort.onnx").exists()
    assert manifest["runtimes"]["onnxruntime"] == {"vision_tower": "vision_tower.onnx"}
    graphs = OnnxVisionGraphs(out)  # the runtime falls back to the portable graph
    assert not graphs.optimized and graphs.graph_file("vision_tower").name == "vision_tower.onnx"
    assert "vision_tower.onnx" in capsys.readouterr().out


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("nvila-export onnx: error:")
    return err


def test_cli_missing_model(tmp_path, capsys):
    assert "does not exist" in _error(["onnx", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o")],
                                      capsys)


def test_cli_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "config.json" in _error(["onnx", "--model", str(tmp_path / "empty"), "--output", str(tmp_path / "o")],
                                   capsys)


def test_cli_unwritable_output(tiny_nvila_lite, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = _error(["onnx", "--model", str(tiny_nvila_lite), "--output", str(tmp_path / "file" / "out")], capsys)
    assert "is a file" in err


def test_cli_existing_output_needs_overwrite(tiny_nvila_lite, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert "--overwrite" in _error(["onnx", "--model", str(tiny_nvila_lite), "--output", str(tmp_path / "out")], capsys)


@pytest.mark.parametrize("flag", [["--opset", "9"], ["--max-tiles", "0"]])
def test_cli_bad_options(tiny_nvila_lite, tmp_path, capsys, flag):
    err = _error(["onnx", "--model", str(tiny_nvila_lite), "--output", str(tmp_path / "o"), *flag], capsys)
    assert flag[0].strip("-").replace("-", "_") in err
