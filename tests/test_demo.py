"""The README's main job: `nvila-quant demo` end to end (shrunk calibration so it fits the test budget)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nvila_quant.demo import DemoSettings, run_demo
from nvila_quant.model import NVILAQwen2
from nvila_quant.model.onnx_vision import OnnxVisionGraphs

pytestmark = pytest.mark.slow  # the whole pipeline (about a minute): `make test`, not `make test-fast`


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo") / "run"
    report = run_demo(workdir, settings=DemoSettings(n_samples=4, seqlen=2048, eval_generations=1, speed=False))
    return workdir, report


def test_demo_awq_beats_rtn(demo):
    workdir, report = demo
    by_name = {c["name"]: c for c in report["candidates"]}
    rtn, awq = by_name["nvila-tiny-rtn-w4g128"]["accuracy"], by_name["nvila-tiny-awq-w4g128"]["accuracy"]
    assert awq["kl_mean"] < rtn["kl_mean"]
    assert awq["top1_agreement"] > rtn["top1_agreement"]
    assert by_name["nvila-tiny-awq-w4g128"]["layer_losses"], "AWQ per-layer losses come from quant_log.json"
    assert by_name["nvila-tiny-awq-w4g128"]["size_ratio"]["llm_mb"] < 0.5


def test_demo_outputs(demo):
    workdir, report = demo
    for name in ("nvila-tiny", "nvila-tiny-rtn-w4g128", "nvila-tiny-awq-w4g128", "onnx/export.json",
                 "report/report.md", "report/report.json", "report/report.html", "report/accuracy.png", "demo.json"):
        assert (workdir / name).exists(), name
    assert any(p.name.startswith("layers_") for p in (workdir / "report").glob("*.png"))
    info = json.loads((workdir / "demo.json").read_text())
    assert info["onnx_same_generation"] is True and info["onnx_worst_relative_error"] < 1e-4
    assert report["onnx"]["visual_cosine"] > 0.9999
    manifest = json.loads((workdir / "onnx" / "export.json").read_text())
    assert manifest["verification"]["passed"] and manifest["verification"]["cases"]  # the demo verified its export
    # and independently of that verification: the exported tower through onnxruntime == the PyTorch tower
    model = NVILAQwen2.load_pretrained(workdir / "nvila-tiny", torch_dtype=torch.float32, device="cpu")
    tiles = torch.rand(2, 3, 448, 448, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        want = model.get_vision_tower()(tiles).numpy()
    got = OnnxVisionGraphs(workdir / "onnx").run_tower(tiles.numpy())
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
