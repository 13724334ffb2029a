"""``nvila-export onnx``: the vision tower, its dynamic-S2 stage and (optionally) the projector as ONNX graphs.

Pipeline: load the vision side only (no LLM) -> export each graph with ``torch.onnx.export`` (dynamo) into a
temporary folder -> ``onnx.checker`` -> write ``export.json`` -> verify with onnxruntime against PyTorch ->
rename the folder into place. Graphs (``[dims]``, symbolic dims in quotes):

- ``vision_tower.onnx``: ``pixel_values ["num_tiles", 3, S, S]`` -> ``features ["num_tiles", T, C]`` (the
  selected layer's hidden states, no post-layernorm; only the layers up to it are exported). Standard ONNX
  ops only: what TensorRT (and any runtime) builds from.
- ``vision_tower.ort.onnx`` (``optimize``, default): the same graph with attention and GELU fused into
  onnxruntime's ``com.microsoft`` ops, sharing ``vision_tower.onnx.data``; what the runtime loads (see
  :mod:`nvila_quant.export.ort_graph`).
- ``s2.onnx`` (dynamic-S2 models): ``features_448 [1, T, C]``, ``features_896 [4, T, C]``,
  ``features_1344 ["rows", "cols", T, C]`` -> ``s2_features ["rows*cols", T, S*C]``. The block size is the
  shape of the last input (a dynamic axis), so one graph serves every grid.
- ``projector.onnx`` (``--include-projector``): ``x ["num_blocks", T, S*C]`` -> ``embeddings ["num_blocks", T', H]``;
  quantized linears keep their integer codes and are dequantized in the graph (see :class:`DequantLinear`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import platform
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import onnx
import torch
from torch import nn
from tqdm.auto import tqdm

from nvila_quant.errors import CheckpointError, ConfigError, NVILAError
from nvila_quant.export.graphs import (
    DequantLinear,
    S2Merge,
    dequantize_reference,
    replace_quantized_linears,
)
from nvila_quant.export.ort_graph import optimize_for_onnxruntime
from nvila_quant.export.verify import verify_export
from nvila_quant.formats.onnx_manifest import FORMAT, MANIFEST_NAME, VERSION, describe_graph
from nvila_quant.io import atomic_output_dir, check_output_dir, write_json
from nvila_quant.model.config import NVILAConfig, load_config
from nvila_quant.model.nvila import NVILAQwen2, build_vision_tower
from nvila_quant.model.vision import VisionTower

__all__ = ["DTYPES", "ExportOptions", "VisionSource", "default_max_tiles", "export_onnx", "load_vision_source"]

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
MIN_OPSET, MAX_OPSET = 17, 23


@dataclass
class ExportOptions:
    """Args:
    opset: ONNX opset (17..23; the dynamo exporter emits 18+ and converts down for 17).
    dtype: "fp32" or "fp16": weights and graph inputs/outputs.
    include_projector: also export ``projector.onnx``.
    max_tiles: largest tile batch the tower graph is declared for (TensorRT profile max; the runtime runs
        larger batches in chunks). None: the most tiles one image can have (17 on NVILA, 13 on NVILA-Lite).
    optimize: also write ``vision_tower.ort.onnx`` (attention and GELU fused into onnxruntime's
        ``com.microsoft`` ops; exact, onnxruntime only), which the runtime then loads.
    verify: compare onnxruntime with PyTorch on real images and fail past tolerance.
    verify_images: image paths for verification (default: built-in photos of 4 aspect ratios).
    """

    opset: int = 18
    dtype: str = "fp32"
    include_projector: bool = False
    max_tiles: int | None = None
    optimize: bool = True
    verify: bool = True
    verify_images: list[str] | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ConfigError(f"opset must be in {MIN_OPSET}..{MAX_OPSET}, got {self.opset}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise ConfigError(f"max_tiles must be >= 1, got {self.max_tiles}")


@dataclass
class VisionSource:
    """The vision side of a checkpoint, in fp32 on CPU: what gets exported and what verification compares to."""

    config: NVILAConfig
    tower: VisionTower
    projector: nn.Module | None = None
    checkpoint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- loading
def _llm_hidden_size(config: NVILAConfig) -> int:
    if config.hidden_size:
        return int(config.hidden_size)
    return int(config.part("llm").read_config()["hidden_size"])


def _build_projector(config: NVILAConfig, mm_hidden: int, hidden: int) -> nn.Module:
    """The projector exactly as the runtime builds it (``NVILAQwen2.build_projector``, which a quantized
    runtime overrides), without loading the LLM."""
    mp_dir = config.part("mm_projector")
    stub = SimpleNamespace(config=config)
    try:
        return NVILAQwen2.build_projector(stub, mp_dir, mm_hidden, hidden, torch.float32, torch.device("cpu"))
    except AttributeError as e:  # the builder needs more of the model: load it whole
        logger.warning("building the projector alone failed (%s); loading the full model", e)
        model = NVILAQwen2.load_pretrained(config, torch_dtype=torch.float32, device="cpu")
        return model.get_mm_projector()


def load_vision_source(path: str | os.PathLike, include_projector: bool = False) -> VisionSource:
    """Load the vision tower (and projector) of an NVILA checkpoint in fp32 on CPU; the LLM is never loaded."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model folder {path} does not exist")
    config = load_config(path)
    vt_dir = config.part("vision_tower")
    tower = build_vision_tower(vt_dir, config, torch.float32, torch.device("cpu")).eval()
    projector = None
    if include_projector:
        projector = _build_projector(config, tower.hidden_size, _llm_hidden_size(config)).eval()
    weights = vt_dir.weight_files()
    extra = {
        "vision_weight_files": [f.name for f in weights],
        "vision_weight_bytes": vt_dir.weight_bytes(),
        "vision_config_sha256": hashlib.sha256(json.dumps(vt_dir.read_config(), sort_keys=True).encode()).hexdigest()
        if vt_dir.flat else hashlib.sha256((vt_dir.folder / "config.json").read_bytes()).hexdigest(),
    }
    return VisionSource(config, tower, projector, str(path.absolute()), extra)


def default_max_tiles(config: NVILAConfig) -> int:
    """Most tiles one image (or video) sends through the tower: 5 + max_tiles on NVILA, max_tiles + 1 on Lite."""
    if config.is_dynamic_s2:
        per_image = sum((s // config.s2_scales[0]) ** 2 for s in config.s2_scales[:-1]) + config.max_tiles
    elif config.image_aspect_ratio == "dynamic":
        per_image = config.max_tiles + 1  # + thumbnail
    else:
        per_image = 1
    return max(per_image, config.num_video_frames)


# ---------------------------------------------------------------------------- export
@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress prints and warnings (our own tqdm reports progress)."""
    names = ("torch.onnx", "torch.export", "torch._export", "torch.fx", "onnxscript", "onnx_ir")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def export_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: Any,
    opset: int,
) -> dict[str, Any]:
    """``torch.onnx.export`` (dynamo) with weights in ``<file>.data``, then ``onnx.checker``; returns the IO spec."""
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(
                module.eval(), args, str(path), input_names=input_names, output_names=output_names,
                dynamic_shapes=dynamic_shapes, opset_version=opset, external_data=True, dynamo=True, verbose=False,
            )
    except Exception as e:  # the exporter raises many types; name the graph that failed
        raise NVILAError(f"torch.onnx.export failed for {path.name}: {type(e).__name__}: {str(e)[:2000]}") from e
    try:
        onnx.checker.check_model(str(path))  # by path: works with external data
    except onnx.checker.ValidationError as e:
        raise NVILAError(f"the exported {path.name} fails onnx.checker: {e}") from e
    return describe_graph(path)


def _export_tower(src: VisionSource, dtype: torch.dtype, out: Path, opset: int, max_tiles: int) -> dict[str, Any]:
    tower = src.tower if dtype == torch.float32 else copy.deepcopy(src.tower).to(dtype)
    s = tower.image_size
    example = torch.randn(2, 3, s, s, dtype=dtype)  # 2 tiles: a size-1 example would specialize the axis
    num_tiles = torch.export.Dim("num_tiles", min=1, max=max(max_tiles, 2))
    return export_graph(tower, (example,), out / "vision_tower.onnx", ["pixel_values"], ["features"],
                        {"images": {0: num_tiles}}, opset)


def _export_s2(src: VisionSource, dtype: torch.dtype, out: Path, opset: int) -> dict[str, Any]:
    cfg, tower = src.config, src.tower
    module = S2Merge(cfg.s2_scales, cfg.s2_resize_output_to_scale_idx, tower.num_patches)
    c, t = tower.config.hidden_size, tower.num_patches
    fixed = [torch.randn(n * n, t, c, dtype=dtype) for n in module.grid]
    last = torch.randn(2, 3, t, c, dtype=dtype)  # rows != cols and both > 1: nothing gets specialized
    rows = torch.export.Dim("rows", min=1, max=64)
    cols = torch.export.Dim("cols", min=1, max=64)
    names = [f"features_{s}" for s in cfg.s2_scales]
    return export_graph(module, (*fixed, last), out / "s2.onnx", names, ["s2_features"],
                        {"features": (*[None] * len(fixed), {0: rows, 1: cols})}, opset)


def _export_projector(src: VisionSource, dtype: torch.dtype, out: Path, opset: int) -> tuple[dict[str, Any], int]:
    projector, n_quant = replace_quantized_linears(src.projector, dtype)
    projector = projector.to(dtype) if n_quant == 0 else _cast_float_params(projector, dtype)
    width = src.tower.hidden_size
    example = torch.randn(2, src.tower.num_patches, width, dtype=dtype)
    num_blocks = torch.export.Dim("num_blocks", min=1, max=1024)
    spec = export_graph(projector, (example,), out / "projector.onnx", ["x"], ["embeddings"],
                        {"x": {0: num_blocks}}, opset)
    return spec, n_quant


def _optimize_tower(src: VisionSource, out: Path, portable: dict[str, Any]) -> dict[str, Any] | None:
    """``vision_tower.ort.onnx`` from the portable tower graph: its manifest entry, or None when not written."""
    with _quiet_exporter():
        info = optimize_for_onnxruntime(out / portable["file"], src.tower.num_layers_used)
    if info is None:
        return None
    spec = describe_graph(info["path"])
    spec["external_data"] = portable["external_data"]  # the weights file is shared, not copied
    spec.update(source_graph=portable["file"], domains=["ai.onnx", "com.microsoft"],
                fused_ops=info["fused_ops"], rewrite_rules=info["rules_applied"])
    return spec


def _cast_float_params(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast float parameters/buffers to ``dtype`` except in DequantLinear (fp32 zeros/scales, bias already cast)."""
    for m in module.modules():
        if isinstance(m, DequantLinear):
            continue
        for p in m.parameters(recurse=False):
            p.data = p.data.to(dtype)
        for name, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point():
                setattr(m, name, b.to(dtype))
    return module


def _manifest(
    src: VisionSource, opts: ExportOptions, max_tiles: int, graphs: dict[str, Any], n_quant: int,
    optimized: dict[str, Any] | None,
) -> dict:
    cfg, tower = src.config, src.tower
    processor = tower.image_processor
    s2 = None
    if graphs.get("s2"):
        s2 = {
            "block_size": "given by the shape of the last scale's input: dims 0 and 1 of "
            f"features_{cfg.s2_scales[-1]} are (rows, cols) of the image's last-scale grid (dynamic axes)",
            "inputs_per_scale": {str(s): ("(n*n, T, C)" if i < len(cfg.s2_scales) - 1 else "(rows, cols, T, C)")
                                 for i, s in enumerate(cfg.s2_scales)},
            "output": "(rows*cols, T, S*C): channels [0:C) scale 0, [C:2C) scale 1, ...; tiles row-major; "
            "tokens (h w) row-major; exactly merge_features_for_dynamic_s2 + split_chessboard",
            "area_interpolation": "float32 in the graph (two averaging matmuls = F.interpolate(mode='area'))",
            "single_tile_rule": "an image without block size (one 448 tile, several images or video frames): "
            "features repeated len(s2_scales) times on channels, block (1, 1); no graph needed",
        }
    projector = None
    if src.projector is not None:
        projector = {
            "type": getattr(src.projector, "projector_type", type(src.projector).__name__),
            "quantized_linears": n_quant,
            "quantized_weights": (
                "codes q as uint8 initializers [N, K] (one code per byte), zero points and scales as float32 "
                "[N, K/G, 1]; in the graph w = (q - z) * s in float32, cast once to the graph dtype, then MatMul "
                "(standard ONNX ops, any runtime; onnxruntime constant-folds it once at session creation)"
                if n_quant else None
            ),
            "merge": "per image, merge_chessboard of the (rows*cols, T', H) output -> (tokens, H)",
        }
    return {
        "format": FORMAT,
        "version": VERSION,
        "opset": opts.opset,
        "dtype": opts.dtype,
        "max_tiles": max_tiles,
        "source": {
            "checkpoint": src.checkpoint,
            "model_type": cfg.model_type,
            "image_aspect_ratio": cfg.image_aspect_ratio,
            "projector_type": (cfg.mm_projector_cfg or {}).get("mm_projector_type"),
            **src.extra,
        },
        "vision": {
            "image_size": tower.image_size,
            "patch_size": tower.config.patch_size,
            "tokens_per_tile": tower.num_patches,
            "hidden_size": tower.config.hidden_size,
            "select_layer": tower.select_layer,
            "layers_exported": tower.num_layers_used,
            "layers_in_checkpoint": tower.config.num_hidden_layers,
            "post_layernorm": False,
            "s2_scales": cfg.s2_scales if cfg.is_dynamic_s2 else None,
            "s2_resize_output_to_scale_idx": cfg.s2_resize_output_to_scale_idx if cfg.is_dynamic_s2 else None,
            "max_tiles_per_image": cfg.max_tiles,
            "preprocessing": {
                "resize": [tower.image_size, tower.image_size],
                "resample": "bicubic",
                "rescale_factor": getattr(processor, "rescale_factor", 1 / 255),
                "image_mean": list(getattr(processor, "image_mean", [0.5] * 3)),
                "image_std": list(getattr(processor, "image_std", [0.5] * 3)),
                "tiling": cfg.image_aspect_ratio,
            },
        },
        "graphs": {name: graphs.get(name) for name in ("vision_tower", "s2", "projector")},
        "optimized": {"vision_tower": optimized} if optimized else None,
        "runtimes": _runtimes(graphs, optimized),
        "s2": s2,
        "projector": projector,
        "verification": None,
        "exporter": {
            "tool": "torch.onnx.export(dynamo=True)",
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "python": platform.python_version(),
            "options": asdict(opts),
        },
    }


def _runtimes(graphs: dict[str, Any], optimized: dict[str, Any] | None) -> dict[str, Any]:
    """Which file each runtime should load, per graph."""
    portable = {name: spec["file"] for name, spec in graphs.items() if spec}
    ort_files = dict(portable, **({"vision_tower": optimized["file"]} if optimized else {}))
    return {
        "onnxruntime": ort_files,
        "tensorrt": portable,
        "note": "graphs/* hold standard ONNX ops only (TensorRT, any runtime); optimized/* add onnxruntime's "
        "com.microsoft ops (MultiHeadAttention, FastGelu) and are for onnxruntime only. On CPU, run the tower "
        "one tile per call: faster than one batch of all tiles (each GEMM's activations stay in cache).",
    }


def export_onnx(
    model: str | os.PathLike | VisionSource,
    output: str | os.PathLike,
    options: ExportOptions | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Export the vision side of an NVILA checkpoint to ``output`` (atomically). Returns ``export.json``'s content.

    ``model``: checkpoint folder, or a :class:`VisionSource` (e.g. with a quantized projector already built).
    Raises :class:`VerificationError` (leaving no output) when onnxruntime disagrees with PyTorch.
    """
    opts = options or ExportOptions()
    check_output_dir(output, opts.overwrite)  # fail before any slow step
    if opts.verify_images:
        for p in opts.verify_images:
            if not Path(p).is_file():
                raise ConfigError(f"verification image not found: {p}")
    src = model if isinstance(model, VisionSource) else load_vision_source(model, opts.include_projector)
    if opts.include_projector and src.projector is None:
        raise ConfigError("include_projector=True but the VisionSource has no projector")
    if not opts.include_projector:
        src = VisionSource(src.config, src.tower, None, src.checkpoint, src.extra)
    dtype = DTYPES[opts.dtype]
    max_tiles = opts.max_tiles or default_max_tiles(src.config)
    if max_tiles < default_max_tiles(src.config):
        logger.warning("max_tiles=%d is below the %d tiles one image can need: the runtime will run such images "
                       "in several tower calls", max_tiles, default_max_tiles(src.config))
    steps = (["vision_tower"] + (["s2"] if src.config.is_dynamic_s2 else [])
             + (["projector"] if src.projector is not None else []))
    graphs: dict[str, Any] = {}
    optimized: dict[str, Any] | None = None
    n_quant = 0
    with atomic_output_dir(output, overwrite=opts.overwrite) as tmp:
        bar = tqdm(steps, desc="export onnx", unit="graph", disable=not progress)
        for step in bar:
            bar.set_postfix_str(step)
            if step == "vision_tower":
                graphs[step] = _export_tower(src, dtype, tmp, opts.opset, max_tiles)
                optimized = _optimize_tower(src, tmp, graphs[step]) if opts.optimize else None
            elif step == "s2":
                graphs[step] = _export_s2(src, dtype, tmp, opts.opset)
            else:
                graphs[step], n_quant = _export_projector(src, dtype, tmp, opts.opset)
        manifest = _manifest(src, opts, max_tiles, graphs, n_quant, optimized)
        write_json(tmp / MANIFEST_NAME, manifest)
        if opts.verify:
            reference = src if n_quant == 0 else VisionSource(
                src.config, src.tower, dequantize_reference(src.projector, torch.float32), src.checkpoint, src.extra
            )
            manifest["verification"] = verify_export(tmp, reference, opts.dtype, opts.verify_images, progress)
            write_json(tmp / MANIFEST_NAME, manifest)
    return manifest
