"""``nvila-quant awq`` / ``rtn`` from the command line: help, errors before work, crash + --resume."""

from __future__ import annotations

import functools

import pytest
from awq_helpers import TEST_CONFIG, assert_same_checkpoint, default_awq

from nvila_quant.cli import build_parser, main
from nvila_quant.commands import awq as awq_command
from nvila_quant.io import read_json
from nvila_quant.quant.runner import work_dir_for

_FLAGS = ["--numerics", TEST_CONFIG["numerics"], "--n-samples", str(TEST_CONFIG["n_samples"]),
          "--text-ratio", str(TEST_CONFIG["text_ratio"]),
          "--seqlen", str(TEST_CONFIG["seqlen"]), "--seed", str(TEST_CONFIG["seed"]), "--quiet"]


def _help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command].format_help()


def test_help_lists_every_flag():
    text = _help("awq")
    for flag in ("--model", "--calib", "--output", "--w-bit", "--group-size", "--no-zero-point", "--targets",
                 "--format", "--n-samples", "--seqlen", "--text-ratio", "--device", "--dtype", "--resume",
                 "--overwrite", "--seed", "--duo-scaling", "--grid-include-one", "--gqa-vo", "--quant-input",
                 "--no-clip", "--numerics", "--no-duo-scaling", "--ratio-search", "--search-tokens", "--gram-loss",
                 "--no-gram-loss"):
        assert flag in text, flag
    assert "--calib" not in _help("rtn") and "--format" in _help("rtn")


def test_numerics_preset_and_overrides_from_flags(tiny_nvila, tmp_path):
    def config(*flags: str):
        args = build_parser().parse_args(["awq", "--model", str(tiny_nvila), "--output", str(tmp_path / "o"), *flags])
        return awq_command.config_from_args(args, "awq")

    fast = config()
    assert fast.numerics == "fast" and fast.duo_scaling and fast.gqa_vo and fast.ratio_search == "coarse"
    assert fast.search_tokens == 4096 and fast.gram_loss
    ref = config("--numerics", "reference")
    assert ref.is_reference and not ref.duo_scaling and ref.search_tokens == 0 and ref.ratio_search == "grid"
    mixed = config("--no-duo-scaling", "--search-tokens", "0", "--ratio-search", "grid", "--no-gram-loss")
    assert not mixed.duo_scaling and mixed.search_tokens == 0 and mixed.ratio_search == "grid"
    assert mixed.gqa_vo and mixed.quant_input and not mixed.gram_loss  # the rest from the preset
    assert config("--numerics", "reference", "--gqa-vo").gqa_vo


class Crash(RuntimeError):
    """Stands for a process killed after an LLM block was saved."""


def _crash_after(index: int):  # noqa: ANN202 (an on_block_done callback)
    def on_block_done(block: int) -> None:
        if block == index:
            raise Crash(f"crash after block {block}")

    return on_block_done


def test_crash_then_resume_equals_uninterrupted(tmp_path, tmp_path_factory, tiny_nvila, monkeypatch):
    reference = default_awq(tmp_path_factory, tiny_nvila)
    out = tmp_path / "resumed"
    argv = ["awq", "--model", str(tiny_nvila), "--output", str(out), *_FLAGS]
    monkeypatch.setattr(awq_command, "quantize", functools.partial(awq_command.quantize, on_block_done=_crash_after(1)))
    with pytest.raises(Crash):
        main(argv)
    work = work_dir_for(out)
    assert not out.exists() and (work / "blocks" / "block_00001.safetensors").is_file()
    assert not (work / "blocks" / "block_00002.safetensors").exists()
    monkeypatch.undo()
    assert main([*argv, "--seed", "7", "--resume"]) == 2  # other settings: refused, work kept
    assert work.exists()
    assert main([*argv, "--resume"]) == 0
    assert not work.exists()
    log = read_json(out / "quant_log.json")
    assert log["resumed_from_block"] == 2 and len(log["blocks"]) == 4
    assert_same_checkpoint(out, reference.output)


def test_errors_are_one_line_and_early(tmp_path, tiny_nvila, capsys):
    out = tmp_path / "x"
    base = ["awq", "--model", str(tiny_nvila), "--output", str(out), "--quiet"]
    assert main([*base, "--w-bit", "3"]) == 2
    assert "packs only [4]-bit weights" in capsys.readouterr().err
    assert main([*base, "--calib", str(tmp_path / "none.jsonl")]) == 2
    assert "is not 'builtin', 'coco', a folder or a .jsonl file" in capsys.readouterr().err
    assert main([*base, "--calib", "coco"]) == 2  # tests run with HF_DATASETS_OFFLINE=1
    assert "--calib FOLDER" in capsys.readouterr().err
    assert main(["awq", "--model", str(tmp_path / "nope"), "--output", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists() and not work_dir_for(out).exists()


def test_rtn_command(tmp_path, tiny_nvila, capsys):
    out = tmp_path / "rtn"
    assert main(["rtn", "--model", str(tiny_nvila), "--output", str(out), "--format", "compressed-tensors",
                 "--w-bit", "8", "--targets", "llm", "--quiet"]) == 0
    assert "wrote rtn checkpoint" in capsys.readouterr().out
    assert read_json(out / "llm/config.json")["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "quantization_config" not in read_json(out / "mm_projector/config.json")
    assert main(["rtn", "--model", str(tiny_nvila), "--output", str(out), "--quiet"]) == 2  # exists
