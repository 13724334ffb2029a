"""The exported projector reads quantized weights (uint8 codes dequantized in the graph).

A small stand-in module exposes the interface the project's quantized linears have (``in_features``,
``out_features``, ``bits``, ``group_size``, ``bias``, ``qtensor()``, ``dequantize_weight(dtype)``); the real
``QuantLinear`` is tested too.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from nvila_quant.export import ExportOptions, export_onnx, load_vision_source
from nvila_quant.export.graphs import DequantLinear, is_quantized_linear, replace_quantized_linears
from nvila_quant.kernels import QuantLinear
from nvila_quant.model.onnx_vision import OnnxVisionGraphs
from nvila_quant.numerics.qtensor import QTensor
from nvila_quant.quant.rtn import write_rtn_checkpoint


class StandInQuantLinear(nn.Module):
    """Group-quantized linear with the project's quantized-linear interface (reference math only)."""

    def __init__(self, linear: nn.Linear, bits: int = 4, group_size: int = 64) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size = bits, group_size
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self._qt = QTensor.from_float(linear.weight.detach().float(), bits, group_size, True, bias=bias)
        self.bias = bias

    def qtensor(self) -> QTensor:
        return self._qt

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = (self._qt.q.float().reshape(self.out_features, -1, self._qt.effective_group_size)
             - self._qt.zero.float()[..., None]) * self._qt.scale.float()[..., None]
        return w.reshape(self.out_features, self.in_features).to(dtype or torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize_weight(x.dtype), bias)


def _quantize_projector(projector: nn.Module, make) -> int:
    count = 0
    for parent in list(projector.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(child))
                count += 1
    return count


def _export_quantized(checkpoint, out, make):
    src = load_vision_source(checkpoint, include_projector=True)
    n = _quantize_projector(src.projector, make)
    manifest = export_onnx(src, out, ExportOptions(include_projector=True, verify_images=[_photo("coffee")]),
                           progress=False)
    return src, n, manifest


def _photo(name: str) -> str:
    from nvila_quant.paths import builtin_calib_dir

    return str(builtin_calib_dir() / f"{name}.jpg")


def _check(out, src, n, manifest) -> None:
    assert manifest["projector"]["quantized_linears"] == n == 3  # NVILA-Lite: 9C->3C, 3C->H, H->H
    assert manifest["verification"]["passed"]
    assert manifest["verification"]["worst"]["projector"]["rel"] <= 1e-4
    model = onnx.load(str(out / "projector.onnx"))
    codes = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.UINT8]
    assert len(codes) == n  # the integer codes are in the file, not a float weight
    assert sorted(tuple(i.dims) for i in codes) == sorted(
        (m.out_features, m.in_features) for m in src.projector.modules() if is_quantized_linear(m)
    )
    graphs = OnnxVisionGraphs(out)
    x = torch.randn(3, 1024, src.tower.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = src.projector(x).numpy()
    got = graphs.run_projector(x.numpy())
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-4


def test_quantized_projector_stand_in(tiny_nvila_lite, tmp_path):
    src, n, manifest = _export_quantized(tiny_nvila_lite, tmp_path / "q", StandInQuantLinear)
    _check(tmp_path / "q", src, n, manifest)


def test_quantized_projector_quantlinear(tiny_nvila_lite, tmp_path):
    make = lambda lin: QuantLinear.from_linear(lin, bits=4, group_size=64, backend="reference")  # noqa: E731
    src, n, manifest = _export_quantized(tiny_nvila_lite, tmp_path / "q", make)
    _check(tmp_path / "q", src, n, manifest)


def test_replace_quantized_linears_keeps_codes():
    lin = nn.Linear(128, 32)
    q = StandInQuantLinear(lin)
    seq = nn.Sequential(nn.LayerNorm(128), q)
    replaced, n = replace_quantized_linears(seq, torch.float32)
    assert n == 1 and isinstance(replaced[1], DequantLinear) and seq[1] is q  # the original is untouched
    assert torch.equal(replaced[1].qweight, q.qtensor().q)
    x = torch.randn(4, 128)
    assert torch.allclose(replaced(x), seq(x), atol=1e-6)


def test_quantized_checkpoint_from_disk(tiny_nvila_lite, tmp_path):
    """A checkpoint whose mm_projector/ is packed int4: loaded as the runtime loads it, exported with its codes."""
    ckpt = write_rtn_checkpoint(tiny_nvila_lite, tmp_path / "ckpt", targets=("projector",), group_size=64)
    manifest = export_onnx(ckpt, tmp_path / "q", ExportOptions(include_projector=True,
                                                               verify_images=[_photo("coffee")]), progress=False)
    assert manifest["projector"]["quantized_linears"] == 3 and manifest["verification"]["passed"]
    # independently of the exporter's verification: the graph's projector == the runtime's packed one
    src = load_vision_source(ckpt, include_projector=True)
    assert sum(isinstance(m, QuantLinear) for m in src.projector.modules()) == 3
    x = torch.randn(2, 1024, src.tower.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = src.projector(x).numpy()
    got = OnnxVisionGraphs(tmp_path / "q").run_projector(x.numpy())
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4
