"""The runtime CLI: make-tiny, info, generate (plain and streamed), demo, --help everywhere."""

from __future__ import annotations

import json

import pytest

from nvila_quant.cli import build_parser, main
from nvila_quant.commands.generate import build_prompt
from nvila_quant.errors import PromptError
from nvila_quant.model.media import Image, Video
from nvila_quant.paths import builtin_calib_dir


def test_every_command_has_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.dest} has no help"
        with pytest.raises(SystemExit):
            main([name, "--help"])
    assert "make-tiny" in capsys.readouterr().out


def test_make_tiny_info_generate(tmp_path, capsys):
    out = tmp_path / "lite"
    assert main(["make-tiny", str(out), "--variant", "nvila-lite", "--seed", "3", "--no-outliers"]) == 0
    spec = json.loads((out / "make_tiny.json").read_text())
    assert spec["spec"]["variant"] == "nvila-lite" and spec["planted_outliers"] == {}
    assert main(["make-tiny", str(out)]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err

    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mm_projector/" in text and "BF16" in text and "float" in text
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["projector_type"] == "mlp_downsample_3x3_fix" and not any(info["quantized"].values())

    image = str(builtin_calib_dir() / "cat.jpg")
    args = ["generate", "--model", str(out), "--image", image, "--prompt", "Describe.", "--max-new-tokens", "5",
            "--dtype", "fp32", "--device", "cpu"]
    assert main(args) == 0
    plain = capsys.readouterr().out.strip()
    assert main([*args, "--stream"]) == 0
    assert capsys.readouterr().out.strip() == plain


def test_info_kernels_describes_this_machine(capsys):
    from nvila_quant.kernels.cpu.native import native_available

    assert main(["info", "--kernels"]) == 0
    text = capsys.readouterr().out
    for line in ("bf16 activations, LLM-shaped layers: ", "fp32 activations, other layers: ", "CUDA: "):
        assert line in text, line
    if native_available():
        assert text.startswith("CPU: native int4 kernels built (") and "T16" in text
    assert main(["info", "--kernels", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["kernels"]
    ranges = d["cpu"]["bf16"]["LLM-shaped layers"]
    assert ranges[0]["tokens"].startswith("1") and ranges[-1]["tokens"].endswith("+")
    assert main(["info"]) == 2 and "--kernels" in capsys.readouterr().err


def test_generate_errors(tmp_path, tiny_nvila, capsys):
    assert main(["generate", "--model", str(tiny_nvila), "--image", str(tmp_path / "none.jpg"), "--prompt", "x"]) == 2
    assert "media file not found" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_build_prompt_places_media():
    assert build_prompt("Describe.", ["a.jpg"], []) == [Image("a.jpg"), "Describe."]
    parts = build_prompt("Compare <image> with <image>, then <vila/video>", ["a.jpg", "b.jpg"], ["v.mp4"])
    assert parts == ["Compare ", Image("a.jpg"), " with ", Image("b.jpg"), ", then ", Video("v.mp4")]
    with pytest.raises(PromptError, match="2 <image> marker\\(s\\) but 1 --image"):
        build_prompt("<image> and <image>", ["a.jpg"], [])

