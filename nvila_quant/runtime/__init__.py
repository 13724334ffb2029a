"""Alternative runtime backends (onnxruntime vision side)."""

from nvila_quant.runtime.onnx_vision import OnnxVisionGraphs, OnnxVisionTower, build_onnx_vision_tower

__all__ = ["OnnxVisionGraphs", "OnnxVisionTower", "build_onnx_vision_tower"]
