"""export/serve_*.sh: each converts the checkpoint to what its engine loads and calls the engine with the README's
command line. The engines need GPUs, so stand-ins record the command; the folders they get pass the oracles."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from serving.sglang_rules import check_sglang_checkpoint
from serving.trtllm_rules import check_trtllm_checkpoint
from serving.vllm_rules import check_vllm_llm_folder

from nvila_quant.model.config import load_config
from nvila_quant.quant.config import AWQConfig
from nvila_quant.quant.runner import quantize

REPO = Path(__file__).resolve().parents[2]
RECORD = "import sys, pathlib; pathlib.Path(__import__('os').environ['RECORD']).write_text(' '.join(sys.argv[1:]))\n"


@pytest.fixture()
def stand_ins(tmp_path: Path) -> dict[str, str]:
    """PATH and PYTHONPATH with fake `vllm`, `sglang.launch_server` and a fake TensorRT-LLM checkout."""
    bin_dir, mods, trt = tmp_path / "bin", tmp_path / "mods", tmp_path / "TensorRT-LLM"
    bin_dir.mkdir()
    (bin_dir / "vllm").write_text(f"#!{sys.executable}\n{RECORD}")
    (bin_dir / "vllm").chmod(0o755)
    (mods / "sglang").mkdir(parents=True)
    (mods / "sglang" / "__init__.py").write_text("")
    (mods / "sglang" / "launch_server.py").write_text(RECORD)
    (trt / "examples" / "llm-api").mkdir(parents=True)
    (trt / "examples" / "llm-api" / "quickstart_multimodal.py").write_text(RECORD)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(mods), env.get("PYTHONPATH", "")])
    env["RECORD"] = str(tmp_path / "argv.txt")
    env["TRTLLM_REPO"] = str(trt)
    return env


def _run(script: str, *args: str, env: dict[str, str]) -> str:
    subprocess.run(["bash", str(REPO / "export" / script), *args], env=env, check=True, capture_output=True,
                   timeout=600)
    return Path(env["RECORD"]).read_text()


def test_scripts_convert_and_call_each_engine(tiny_nvila, tmp_path, stand_ins):
    model = tmp_path / "model"  # int4 without zero points: what all three engines take
    quantize(tiny_nvila, AWQConfig(method="rtn", zero_point=False), None, model, progress=False)

    argv = _run("serve_sglang.sh", str(model), "2", "--port", "30001", env=stand_ins)
    flat = tmp_path / "model-hf"
    assert argv == f"--model-path {flat} --trust-remote-code --tp 2 --port 30001"
    assert load_config(flat).layout == "hf"
    assert check_sglang_checkpoint(flat, stock_geometry=False) == []

    argv = _run("serve_vllm.sh", str(flat), "--max-model-len", "4096", env=stand_ins)
    folders = tmp_path / "model-hf-vila"
    assert argv == f"serve {folders}/llm --max-model-len 4096"
    assert check_vllm_llm_folder(folders / "llm") == []

    argv = _run("serve_trtllm.sh", str(model), stand_ins["TRTLLM_REPO"], env=stand_ins)
    assert argv == f"--model_dir {tmp_path / 'model-trtllm'} --model_type vila"
    assert check_trtllm_checkpoint(tmp_path / "model-trtllm") == []
