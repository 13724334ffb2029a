"""The wheel carries everything the commands need: built, installed into a fresh venv (reusing this environment's
torch and other dependencies) and run from outside the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a fresh venv holding only the wheel; the running environment's packages come in through a .pth."""
    root = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root), str(REPO)],
         cwd=root)
    wheel = next(root.glob("nvila_quant-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("nvila_quant/data/builtin/metadata.jsonl", "nvila_quant/data/builtin/cat.jpg",
                    "nvila_quant/data/eval/text.jsonl", "nvila_quant/data/DATACARD.md",
                    "nvila_quant/testing/corpus.json", "nvila_quant/kernels/cpu/csrc/nq_shared.h",
                    "nvila_quant/kernels/cuda/csrc/w4a16_mma.cu", "nvila_quant/data/remote_code/processing_nvila.py",
                    "nvila_quant/data/remote_code/configuration_nvila.py",
                    "nvila_quant/data/eval_tasks/nvq_mc.yaml"):
        assert shipped in names, shipped
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=root)
    site = Path(_run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root).stdout.strip())
    (site / "running_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co, not the repo
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=root)
    where = _run([str(venv / "bin" / "python"), "-c", "import nvila_quant; print(nvila_quant.__file__)"], cwd=root)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout  # the wheel's copy, not the repository's
    return venv / "bin"


def test_onnxruntime_distribution_is_the_one_the_markers_pick() -> None:
    """onnxruntime-gpu where PyPI has wheels of it, onnxruntime elsewhere: the installed one is the one the
    project's requirement markers select here (and the other is absent: the two cannot share an environment)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    picked = {}
    for line in metadata.requires("nvila-quant") or []:
        req = Requirement(line)
        if req.name in ("onnxruntime", "onnxruntime-gpu") and not (req.marker and "extra" in str(req.marker)):
            picked[req.name] = req.marker is None or req.marker.evaluate()
    assert set(picked) == {"onnxruntime", "onnxruntime-gpu"} and sum(picked.values()) == 1, picked
    for name, wanted in picked.items():
        try:
            metadata.version(name)
            installed = True
        except metadata.PackageNotFoundError:
            installed = False
        assert installed == wanted, (name, wanted)
    import onnxruntime

    assert "CPUExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.slow
def test_wheel_runs_awq_compare_and_demo_outside_the_repository(installed: Path, tiny_nvila: Path,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "awq"
    _run([str(installed / "nvila-quant"), "awq", "--model", str(tiny_nvila), "--calib", "builtin", "--output", str(out),
          "--n-samples", "2", "--seqlen", "256", "--quiet"], cwd=tmp_path)
    assert json.loads((out / "quant_log.json").read_text())["calibration"]["source"] == "builtin"
    report = tmp_path / "report"
    _run([str(installed / "nvila-quant"), "compare", "--reference", str(tiny_nvila), "--candidate", str(out),
          "--output", str(report), "--no-speed", "--generations", "1", "--max-new-tokens", "4"], cwd=tmp_path)
    assert json.loads((report / "report.json").read_text())["candidates"][0]["accuracy"]["kl_mean"] >= 0
    flat = tmp_path / "awq-hf"  # the -hf export ships the remote code from the wheel's package data
    _run([str(installed / "nvila-quant"), "convert", "--model", str(out), "--to", "hf", "--output", str(flat),
          "--quiet"], cwd=tmp_path)
    assert (flat / "processing_nvila.py").is_file() and (flat / "configuration_nvila.py").is_file()
    demo = _run([str(installed / "nvila-quant"), "demo", "--workdir", str(tmp_path / "demo"), "--n-samples", "2",
                 "--no-speed"], cwd=tmp_path)
    assert "report" in demo.stdout.lower()
    assert _run([str(installed / "nvila-export"), "--help"], cwd=tmp_path).stdout.startswith("usage: nvila-export")
