"""``export.json``: the machine-readable description of an ``nvila-export onnx`` folder.

Layout (``version`` 1)::

    {"format": "nvila-onnx", "version": 1, "opset": 18, "dtype": "fp32", "max_tiles": 17,
     "source": {checkpoint, model_type, image_aspect_ratio, projector_type, vision weights fingerprint},
     "vision": {image_size, patch_size, tokens_per_tile, hidden_size, select_layer, layers_exported,
                s2_scales, s2_resize_output_to_scale_idx, preprocessing},
     "graphs": {"vision_tower": {file, external_data, inputs, outputs, dynamic_axes}, "s2": {...} | null,
                "projector": {...} | null},                       # standard ONNX ops: TensorRT, any runtime
     "optimized": {"vision_tower": {file, external_data (shared), ..., fused_ops}} | null,  # onnxruntime only
     "runtimes": {"onnxruntime": {graph: file}, "tensorrt": {graph: file}, "note"},
     "s2": {how the block size is given, the single-tile rule} | null,
     "projector": {type, quantized linears, how they are stored} | null,
     "verification": {...} | null, "exporter": {...}}

Each graph's ``inputs`` / ``outputs`` list ``{"name", "shape", "dtype"}`` with symbolic dims as strings.
``optimized`` and ``runtimes`` are absent from folders written before they existed: readers then use ``graphs``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx

from nvila_quant.errors import CheckpointError
from nvila_quant.io import read_json

__all__ = ["FORMAT", "MANIFEST_NAME", "VERSION", "describe_graph", "read_manifest"]

FORMAT = "nvila-onnx"
VERSION = 1
MANIFEST_NAME = "export.json"
GRAPH_NAMES = ("vision_tower", "s2", "projector")


def _value_info(v: onnx.ValueInfoProto) -> dict[str, Any]:
    t = v.type.tensor_type
    shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
    return {"name": v.name, "shape": shape, "dtype": dtype}


def describe_graph(path: str | os.PathLike) -> dict[str, Any]:
    """Inputs, outputs (name, shape with symbolic dims, dtype) and dynamic axes of an ONNX file."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    inputs = [_value_info(v) for v in model.graph.input]
    outputs = [_value_info(v) for v in model.graph.output]
    dynamic = {
        io["name"]: {str(i): d for i, d in enumerate(io["shape"]) if isinstance(d, str)}
        for io in inputs + outputs
        if any(isinstance(d, str) for d in io["shape"])
    }
    data = path.with_name(path.name + ".data")
    return {
        "file": path.name,
        "external_data": data.name if data.exists() else None,
        "inputs": inputs,
        "outputs": outputs,
        "dynamic_axes": dynamic,
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
    }


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``export.json`` of an export folder (format, version, graph files present)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"ONNX export folder {folder} does not exist; create it with `nvila-export onnx`")
    manifest = read_json(folder / MANIFEST_NAME)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{folder / MANIFEST_NAME} is not an nvila-export manifest "
                              f"(format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{folder / MANIFEST_NAME} has version {manifest.get('version')}; this nvila-quant reads version {VERSION}"
        )
    graphs = manifest.get("graphs") or {}
    if not graphs.get("vision_tower"):
        raise CheckpointError(f"{folder / MANIFEST_NAME} lists no vision_tower graph")
    optimized = manifest.get("optimized") or {}
    for name, spec in [(n, graphs.get(n)) for n in GRAPH_NAMES] + [(f"optimized {n}", s) for n, s in optimized.items()]:
        if not spec:
            continue
        for key in ("file", "external_data"):
            if spec.get(key) and not (folder / spec[key]).is_file():
                raise CheckpointError(f"{folder} lacks {spec[key]} (the {name} graph named in {MANIFEST_NAME})")
    return manifest
