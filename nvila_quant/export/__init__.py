"""ONNX export of NVILA's vision side (``nvila-export onnx``): graphs, ``export.json`` and verification."""

from nvila_quant.export.onnx import (
    ExportOptions,
    VisionSource,
    default_max_tiles,
    export_onnx,
    load_vision_source,
)
from nvila_quant.export.verify import TOLERANCES, VerificationError, verify_export

__all__ = [
    "TOLERANCES",
    "ExportOptions",
    "VerificationError",
    "VisionSource",
    "default_max_tiles",
    "export_onnx",
    "load_vision_source",
    "verify_export",
]
