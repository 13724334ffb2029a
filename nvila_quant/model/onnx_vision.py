"""The onnxruntime vision backend: run an ``nvila-export onnx`` folder.

- :class:`OnnxVisionGraphs`: numpy in, numpy out; the whole vision side of an image through onnxruntime
  (vision tower -> S2 -> projector), no torch needed. Used by verification, the benchmark and deployers.
- :class:`OnnxVisionTower`: a drop-in for :class:`nvila_quant.model.vision.VisionTower` (same attributes,
  ``forward(tiles) -> features``) so ``encode_images``, ``generate_content`` and ``stream_gen`` run unchanged;
  ``NVILAQwen2.load_pretrained(path, vision_backend="onnx", onnx_dir=DIR)`` builds it.

Providers: CUDA when a GPU is present (``torch.cuda.is_available()``), CPU otherwise. The tower runs from
``vision_tower.ort.onnx`` (onnxruntime-fused attention and GELU) when the export has it, else from the
portable ``vision_tower.onnx``. On CPU the tower runs one tile per call (``tile_batch=1``): each GEMM's
activations (1024 x 1152 floats) then stay in cache, where a batch of 17 tiles streams 80 MB from memory per
weight panel (measured in benchmarks/README.md). Other providers get batches of up to ``max_tiles``.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from einops import rearrange
from torch import nn
from transformers import SiglipVisionConfig

from nvila_quant.errors import CheckpointError, ConfigError, MediaError
from nvila_quant.formats.onnx_manifest import read_manifest
from nvila_quant.io import Part, as_part
from nvila_quant.model.vision import TowerGeometry, load_image_processor

__all__ = ["OnnxVisionGraphs", "OnnxVisionTower", "build_onnx_vision_tower", "default_providers"]

logger = logging.getLogger(__name__)

VISION_BACKENDS = ("torch", "onnx")


def default_providers() -> list[str]:
    """``CUDAExecutionProvider`` (then CPU) when a GPU is present and onnxruntime has CUDA, else CPU only."""
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session(path: Path, providers: list[str], threads: int | None, allow_spinning: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not allow_spinning:  # do not keep cores busy between calls (the LLM runs right after, in torch)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types
        raise CheckpointError(f"onnxruntime cannot load {path}: {e}") from e


class OnnxVisionGraphs:
    """The graphs of an export folder as onnxruntime sessions (created on first use).

    All methods take and return numpy arrays; inputs are cast to the graphs' dtype (``manifest["dtype"]``).
    ``optimized``: load the onnxruntime-optimized tower graph when the export has one (False: the portable
    graph TensorRT builds from). ``tile_batch``: tiles per tower call (default: 1 on CPU, ``max_tiles`` else).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        providers: list[str] | None = None,
        threads: int | None = None,
        allow_spinning: bool = True,
        optimized: bool = True,
        tile_batch: int | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.providers = providers or default_providers()
        self.threads = threads
        self.allow_spinning = allow_spinning
        self.optimized = optimized and bool((self.manifest.get("optimized") or {}).get("vision_tower"))
        cpu_only = all((p if isinstance(p, str) else p[0]) == "CPUExecutionProvider" for p in self.providers)
        if tile_batch is not None and tile_batch < 1:
            raise ConfigError(f"tile_batch must be >= 1, got {tile_batch}")
        self.tile_batch: int | None = tile_batch or (1 if cpu_only else None)  # None: max_tiles
        self._sessions: dict[str, ort.InferenceSession] = {}
        vision = self.manifest["vision"]
        self.image_size: int = vision["image_size"]
        self.tokens_per_tile: int = vision["tokens_per_tile"]
        self.hidden_size: int = vision["hidden_size"]
        self.scales: list[int] | None = vision.get("s2_scales") or None
        self.max_tiles: int = self.manifest["max_tiles"]
        self.np_dtype = np.dtype("float16" if self.manifest["dtype"] == "fp16" else "float32")

    # ------------------------------------------------------------------ sessions
    def has(self, name: str) -> bool:
        return bool(self.manifest["graphs"].get(name))

    def graph_file(self, name: str) -> Path:
        """The file a session for graph ``name`` loads (the optimized tower when ``self.optimized``)."""
        spec = self.manifest["optimized"]["vision_tower"] if name == "vision_tower" and self.optimized else (
            self.manifest["graphs"][name]
        )
        return self.folder / spec["file"]

    def session(self, name: str) -> ort.InferenceSession:
        if not self.has(name):
            hint = " (export with --include-projector)" if name == "projector" else ""
            raise ConfigError(f"{self.folder} has no {name} graph{hint}")
        if name not in self._sessions:
            self._sessions[name] = _session(self.graph_file(name), self.providers, self.threads, self.allow_spinning)
        return self._sessions[name]

    @property
    def active_providers(self) -> list[str]:
        return self.session("vision_tower").get_providers()

    def _run(self, name: str, *arrays: np.ndarray) -> np.ndarray:
        spec = self.manifest["graphs"][name]
        feeds = {io["name"]: np.ascontiguousarray(a, dtype=self.np_dtype)
                 for io, a in zip(spec["inputs"], arrays, strict=True)}
        return self.session(name).run(None, feeds)[0]

    # ------------------------------------------------------------------ graphs
    def check_tiles(self, shape: tuple[int, ...]) -> None:
        s = self.image_size
        if len(shape) != 4 or tuple(shape[1:]) != (3, s, s) or shape[0] < 1:
            raise MediaError(
                f"the exported vision tower takes pixel tiles of shape [num_tiles, 3, {s}, {s}] "
                f"(num_tiles >= 1), got {list(shape)}"
            )

    def run_tower(self, pixels: np.ndarray) -> np.ndarray:
        """pixels: (N, 3, S, S) -> selected features (N, T, C), in calls of ``tile_batch`` (<= max_tiles) tiles."""
        self.check_tiles(tuple(pixels.shape))
        step = min(self.tile_batch or self.max_tiles, self.max_tiles)
        chunks = [pixels[i : i + step] for i in range(0, pixels.shape[0], step)]
        return np.concatenate([self._run("vision_tower", c) for c in chunks], axis=0)

    def s2_tile_counts(self, block_size: tuple[int, int]) -> list[int]:
        """Tiles per scale of one dynamic-S2 image: [1, 4, rows*cols] for 448/896/1344."""
        if not self.scales:
            raise ConfigError(f"{self.folder} was exported from a model without dynamic S2")
        rows, cols = block_size
        if rows < 1 or cols < 1:
            raise MediaError(f"block size must be (rows >= 1, cols >= 1), got {tuple(block_size)}")
        return [(s // self.scales[0]) ** 2 for s in self.scales[:-1]] + [rows * cols]

    def run_s2(self, features: np.ndarray, block_size: tuple[int, int] | None) -> np.ndarray:
        """One image's tile features (n_tiles, T, C) -> multi-scale features (nb, T, S*C).

        ``block_size`` None (a single 448 tile): the map repeated over all scales, block (1, 1), no graph needed.
        """
        if not self.scales:
            raise ConfigError(f"{self.folder} was exported from a model without dynamic S2")
        if block_size is None:
            if features.shape[0] != 1:
                raise MediaError(f"an image without block size has 1 tile, got {features.shape[0]}")
            return np.concatenate([features] * len(self.scales), axis=-1)  # (1, T, S*C)
        counts = self.s2_tile_counts(block_size)
        if features.shape[0] != sum(counts):
            raise MediaError(
                f"block size {tuple(block_size)} needs {sum(counts)} tiles ({' + '.join(map(str, counts))}), "
                f"got features of {features.shape[0]} tiles"
            )
        parts = np.split(features, np.cumsum(counts)[:-1], axis=0)
        parts[-1] = parts[-1].reshape(block_size[0], block_size[1], *features.shape[1:])  # (rows, cols, T, C)
        return self._run("s2", *parts)

    def run_projector(self, x: np.ndarray) -> np.ndarray:
        """(B, T, mm_hidden) -> (B, T', H)."""
        return self._run("projector", x)

    def encode(self, pixels: np.ndarray, block_size: tuple[int, int] | None = None) -> np.ndarray:
        """The vision side of ONE image (or of one tile per image when not dynamic S2).

        Dynamic S2: (n_tiles, 3, S, S) -> (nb, T, S*C), or with the projector the LLM-space tokens
        (tokens, H) exactly as ``encode_images``. Otherwise: (N, T, C), or (N, T', H) with the projector.
        """
        features = self.run_tower(pixels)
        if self.scales:
            features = self.run_s2(features, block_size)
        if not self.has("projector"):
            return features
        projected = self.run_projector(features)  # (nb, T', H)
        if not self.scales:
            return projected
        return merge_block(projected, *self.output_block(block_size))  # (tokens, H)

    def output_block(self, block_size: tuple[int, int] | None) -> tuple[int, int]:
        """(rows, cols) of the S2 output: the last scale's block, or (n, n) of the resize scale, (1, 1) for one tile."""
        if block_size is None:
            return (1, 1)
        assert self.scales is not None
        idx = self.manifest["vision"]["s2_resize_output_to_scale_idx"] % len(self.scales)
        if idx == len(self.scales) - 1:
            return (int(block_size[0]), int(block_size[1]))
        n = self.scales[idx] // self.scales[0]
        return (n, n)


class OnnxVisionTower(TowerGeometry, nn.Module):
    """Drop-in for ``VisionTower`` whose features come from ``vision_tower.onnx`` through onnxruntime.

    forward(images (N, 3, S, S)) -> (N, T, C) on the images' device and dtype. It has no parameters; the S2
    merge and the projector stay in PyTorch (they are the same numerics as the exported graphs, verified).
    """

    def __init__(
        self,
        graphs: OnnxVisionGraphs,
        config: SiglipVisionConfig,
        select_layer: int = -2,
        select_feature: str = "cls_patch",
        scales: list[int] | None = None,
        resize_output_to_scale_idx: int = -1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.graphs = graphs
        self._config = config
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.scales = list(scales) if scales else None
        self.resize_output_to_scale_idx = resize_output_to_scale_idx
        self.image_processor = None
        self._dtype = dtype
        self._device = torch.device(device)

    @property
    def config(self) -> SiglipVisionConfig:
        return self._config

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def _apply(self, fn: Any, recurse: bool = True) -> OnnxVisionTower:  # follow model.to(device / dtype)
        probe = fn(torch.zeros((), dtype=self._dtype, device=self._device))
        self._dtype, self._device = probe.dtype, probe.device
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        raise CheckpointError(  # save_pretrained would otherwise write an empty vision_tower/
            "this model's vision tower runs from ONNX and has no PyTorch weights; load the checkpoint with "
            "vision_backend='torch' to save it"
        )

    def check_tiles(self, images: torch.Tensor) -> None:
        self.graphs.check_tiles(tuple(images.shape))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, S, S) -> selected features (N, T, C)."""
        self.check_tiles(images)
        pixels = images.detach().to("cpu", torch.float32).numpy()
        features = torch.from_numpy(self.graphs.run_tower(pixels))  # (N, T, C)
        out_dtype = images.dtype if images.is_floating_point() else self._dtype
        return features.to(device=images.device, dtype=out_dtype)

    def extra_repr(self) -> str:
        g = self.graphs
        return (f"graph={g.graph_file('vision_tower')}, providers={g.providers}, dtype={g.manifest['dtype']}, "
                f"tile_batch={g.tile_batch or g.max_tiles}")


def _check_against_checkpoint(manifest: dict, vt: Part, config: Any, vision_cfg: SiglipVisionConfig) -> None:
    """Refuse an export folder made from a different vision tower (architecture, layer, scales, weight files)."""
    vision = manifest["vision"]
    want = {
        "image_size": vision_cfg.image_size,
        "patch_size": vision_cfg.patch_size,
        "hidden_size": vision_cfg.hidden_size,
        "select_layer": config.mm_vision_select_layer,
        "s2_scales": config.s2_scales if config.is_dynamic_s2 else None,
    }
    if config.is_dynamic_s2:
        want["s2_resize_output_to_scale_idx"] = config.s2_resize_output_to_scale_idx
    bad = {k: (vision.get(k), v) for k, v in want.items() if vision.get(k) != v}
    if bad:
        detail = ", ".join(f"{k}: export {a!r} vs checkpoint {b!r}" for k, (a, b) in bad.items())
        raise CheckpointError(f"the ONNX export does not match the checkpoint's vision tower ({detail}); re-export it")
    sizes = manifest.get("source", {}).get("vision_weight_bytes")
    if sizes is not None:
        now = vt.weight_bytes()
        # older exports recorded the file sizes
        legacy = None if vt.flat else sum(f.stat().st_size for f in vt.weight_files())
        if sizes not in (now, legacy):
            raise CheckpointError(
                f"the ONNX export was made from vision weights of {sizes} bytes but {vt} holds {now}; re-export it"
            )


def build_onnx_vision_tower(
    vision_backend: str,
    onnx_dir: str | os.PathLike | None,
    vt_dir: Path | Part,
    config: Any,
    dtype: torch.dtype,
    device: torch.device,
    providers: list[str] | None = None,
) -> OnnxVisionTower:
    """The runtime hook of ``NVILAQwen2.init_vlm(..., vision_backend="onnx", onnx_dir=DIR)``."""

    if vision_backend not in VISION_BACKENDS:
        raise ConfigError(f"vision_backend must be one of {', '.join(VISION_BACKENDS)}, got {vision_backend!r}")
    if vision_backend != "onnx" or onnx_dir is None:
        raise ConfigError("onnx_dir= is used with vision_backend='onnx', and vision_backend='onnx' needs onnx_dir=")
    graphs = OnnxVisionGraphs(onnx_dir, providers=providers, allow_spinning=False)
    vt = as_part(vt_dir)
    cfg = vt.read_config()
    cfg = cfg.get("vision_config", {}) if cfg.get("model_type") == "siglip" else cfg
    vision_cfg = SiglipVisionConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
    _check_against_checkpoint(graphs.manifest, vt, config, vision_cfg)
    tower = OnnxVisionTower(
        graphs,
        vision_cfg,
        select_layer=config.mm_vision_select_layer,
        select_feature=config.mm_vision_select_feature,
        scales=config.s2_scales if config.is_dynamic_s2 else None,
        resize_output_to_scale_idx=config.s2_resize_output_to_scale_idx,
        dtype=dtype,
        device=device,
    )
    tower.image_processor = load_image_processor(vt.folder, vision_cfg.image_size)
    logger.info("vision tower: onnxruntime (%s) from %s", ", ".join(map(str, graphs.providers)),
                graphs.graph_file("vision_tower"))
    return tower


def merge_block(projected: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """``merge_chessboard`` + ``(h w) c``: (rows*cols, t, H) -> (rows*sqrt(t) * cols*sqrt(t), H)."""
    side = math.isqrt(projected.shape[1])
    return rearrange(projected, "(r c) (h w) d -> (r h c w) d", r=rows, c=cols, h=side, w=side)
