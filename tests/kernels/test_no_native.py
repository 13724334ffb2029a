"""Without the native CPU kernels (no C compiler, empty kernel cache) the runtime still answers, says once why and
what it costs, and ``info --kernels`` names the cause."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nvila_quant.quant.rtn import write_rtn_checkpoint

WARNING = "native CPU int4 kernels unavailable: the compiler 'cc' is not on PATH"


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    (tmp / "bin").mkdir(exist_ok=True)  # a PATH with no compiler on it
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVILA_QUANT_")}
    env.update(PATH=str(tmp / "bin"), NVILA_QUANT_CACHE=str(tmp / "empty-cache"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "nvila_quant.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp)


@pytest.mark.slow
def test_generate_without_a_compiler_warns_once_and_answers(tiny_nvila: Path, tmp_path: Path) -> None:
    quantized = write_rtn_checkpoint(tiny_nvila, tmp_path / "q", "autoawq")
    result = _run(["generate", "--model", str(quantized), "--prompt", "Describe a cat.", "--max-new-tokens", "4",
                   "--dtype", "bf16", "--device", "cpu"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("native CPU int4 kernels unavailable") == 1 and WARNING in result.stderr
    assert "several times slower" in result.stderr
    assert result.stdout.endswith("\n")  # the answer (noise: a synthetic model), printed
    info = _run(["info", "--kernels"], tmp_path)
    assert info.returncode == 0, info.stderr
    assert info.stdout.startswith("CPU: native int4 kernels unavailable\n")
    assert "the compiler 'cc' is not on PATH" in info.stdout
    assert "torch's int4 op" in info.stdout
