"""Verification of an export folder: onnxruntime against PyTorch on real preprocessed images.

Each case (one image, or several images as single tiles) goes through PyTorch (fp32, the model's own code) and
through onnxruntime, loaded exactly as the runtime loads the folder (``OnnxVisionGraphs`` defaults: the
onnxruntime-optimized tower when there is one, one tile per call on CPU). Every graph is compared on the SAME
inputs as PyTorch (isolating its error), and the whole ONNX chain is compared end to end (``pipeline``). When
the tower also has an optimized graph, the portable one (TensorRT's input) is checked too, on all of a case's
tiles in one call (``vision_tower_portable``). Metrics per output: ``max_abs``, ``rel`` = max|ort - torch| /
max|torch|, ``cosine`` (flattened, float64). Tolerances: fp32 rel <= 1e-4; fp16 (compared with the fp32 model,
so weight rounding counts) rel <= 2e-2 and cosine >= 0.999.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from einops import rearrange
from tqdm.auto import tqdm

from nvila_quant.errors import NVILAError
from nvila_quant.model.media import dynamic_preprocess, dynamic_s2_preprocess, load_image
from nvila_quant.model.onnx_vision import OnnxVisionGraphs
from nvila_quant.model.vision import merge_chessboard, merge_features_for_dynamic_s2, split_chessboard
from nvila_quant.paths import builtin_calib_dir

__all__ = [
    "TOLERANCES",
    "Case",
    "Tolerance",
    "VerificationError",
    "compare",
    "default_images",
    "torch_reference",
    "verification_cases",
    "verify_export",
]


@dataclass(frozen=True)
class Tolerance:
    rel: float  # max |ort - torch| / max |torch|, per output
    cosine: float  # minimum cosine similarity, per output


TOLERANCES = {"fp32": Tolerance(rel=1e-4, cosine=0.99999), "fp16": Tolerance(rel=2e-2, cosine=0.999)}


class VerificationError(NVILAError):
    """onnxruntime's outputs differ from PyTorch's past the tolerance."""


@dataclass
class Case:
    """One verification input: tiles (N, 3, S, S) fp32 and one block size per image (None: a single tile)."""

    name: str
    pixels: torch.Tensor
    block_sizes: list[tuple[int, int] | None]
    image_sizes: list[tuple[int, int]]


def compare(reference: np.ndarray, output: np.ndarray) -> dict[str, Any]:
    """max-abs, relative max-abs (to max |reference|) and cosine of two arrays of the same shape."""
    if reference.shape != output.shape:
        raise VerificationError(f"onnxruntime output shape {list(output.shape)} != PyTorch {list(reference.shape)}")
    ref, out = reference.astype(np.float64).ravel(), output.astype(np.float64).ravel()
    max_abs = float(np.abs(out - ref).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    denom = float(np.linalg.norm(ref) * np.linalg.norm(out))
    cosine = float(ref @ out / denom) if denom > 0 else float(np.array_equal(ref, out))
    return {"shape": list(reference.shape), "max_abs": max_abs, "ref_max_abs": scale,
            "rel": max_abs / scale if scale > 0 else max_abs, "cosine": cosine}


# ---------------------------------------------------------------------------- inputs
def default_images() -> list[PIL.Image.Image | Path]:
    """Built-in photos in four aspect ratios: square, 3:2 landscape, 2:3 portrait, a 4:1 panorama strip."""
    root = builtin_calib_dir()
    rocket = load_image(root / "rocket.jpg").transpose(PIL.Image.Transpose.ROTATE_90)  # portrait
    strip = load_image(root / "photographer.jpg")
    strip = strip.crop((0, 192, 512, 320))  # 512 x 128 panorama
    return [root / "astronaut.jpg", root / "coffee.jpg", rocket, strip]


def _name(image: PIL.Image.Image | str | os.PathLike, i: int) -> str:
    return Path(image).name if isinstance(image, str | os.PathLike) else f"image{i}-{image.size[0]}x{image.size[1]}"


def verification_cases(src: Any, images: Sequence[PIL.Image.Image | str | os.PathLike] | None = None) -> list[Case]:
    """One case per image (tiled as the model tiles it) plus one with all images as single tiles."""
    cfg, tower = src.config, src.tower
    size = tower.image_size
    loaded = [(load_image(im), _name(im, i)) for i, im in enumerate(images or default_images())]

    def pixels(tiles: list[PIL.Image.Image]) -> torch.Tensor:
        return tower.image_processor(tiles, return_tensors="pt")["pixel_values"].to(torch.float32)

    cases = []
    for im, name in loaded:
        if cfg.is_dynamic_s2:
            tiles, block = dynamic_s2_preprocess(im, cfg.s2_scales, cfg.max_tiles, size)
            cases.append(Case(name, pixels(tiles), [block], [im.size]))
        elif cfg.image_aspect_ratio == "dynamic":
            tiles = dynamic_preprocess(im, cfg.min_tiles, cfg.max_tiles, size)
            cases.append(Case(name, pixels(tiles), [None] * len(tiles), [im.size]))
        else:
            cases.append(Case(name, pixels([im]), [None], [im.size]))
    if len(loaded) > 1:
        cases.append(Case(f"{len(loaded)} images, one tile each", pixels([im for im, _ in loaded]),
                          [None] * len(loaded), [im.size for im, _ in loaded]))
    return cases


# ---------------------------------------------------------------------------- PyTorch side
def _s2_torch(src: Any, features: torch.Tensor, block_sizes: list) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """encode_images' S2 part: (tiles, T, C) -> (sum nb, T, S*C) and the output blocks."""
    cfg = src.config
    merged, blocks = merge_features_for_dynamic_s2(features, block_sizes, cfg.s2_scales,
                                                   cfg.s2_resize_output_to_scale_idx)
    split = [rearrange(split_chessboard(m, *b), "b c h w -> b (h w) c") for m, b in zip(merged, blocks, strict=True)]
    return torch.cat(split, dim=0), blocks


@torch.inference_mode()
def torch_reference(src: Any, case: Case) -> dict[str, np.ndarray]:
    """PyTorch outputs of every stage: vision_tower, s2, projector and the full chain (pipeline)."""
    out: dict[str, np.ndarray] = {}
    x = src.tower(case.pixels)  # (N, T, C)
    out["vision_tower"] = x.numpy()
    blocks: list[tuple[int, int]] | None = None
    if src.config.is_dynamic_s2:
        x, blocks = _s2_torch(src, x, case.block_sizes)  # (sum nb, T, S*C)
        out["s2"] = x.numpy()
    if src.projector is not None:
        x = src.projector(x)  # (sum nb, T', H)
        out["projector"] = x.numpy()
        if blocks is not None:
            per_image = x.split([r * c for r, c in blocks], dim=0)
            x = torch.cat([rearrange(merge_chessboard(p, *b), "1 c h w -> (h w) c")
                           for p, b in zip(per_image, blocks, strict=True)])
    out["pipeline"] = x.numpy()
    return out


# ---------------------------------------------------------------------------- onnxruntime side
def _ort_outputs(graphs: Any, case: Case, ref: dict[str, np.ndarray], portable: Any = None) -> dict[str, np.ndarray]:
    """Each graph on PyTorch's inputs, and the ONNX chain on the pixels alone."""
    out = {"vision_tower": graphs.run_tower(case.pixels.numpy())}
    if portable is not None:
        out["vision_tower_portable"] = portable.run_tower(case.pixels.numpy())
    if "s2" in ref:
        counts = [1 if b is None else sum(graphs.s2_tile_counts(b)) for b in case.block_sizes]
        feats = np.split(ref["vision_tower"], np.cumsum(counts)[:-1], axis=0)
        out["s2"] = np.concatenate([graphs.run_s2(f, b) for f, b in zip(feats, case.block_sizes, strict=True)], axis=0)
    if "projector" in ref:
        out["projector"] = graphs.run_projector(ref["s2"] if "s2" in ref else ref["vision_tower"])
    if graphs.scales:
        counts = [1 if b is None else sum(graphs.s2_tile_counts(b)) for b in case.block_sizes]
        tiles = np.split(case.pixels.numpy(), np.cumsum(counts)[:-1], axis=0)
        out["pipeline"] = np.concatenate([graphs.encode(t, b) for t, b in zip(tiles, case.block_sizes, strict=True)],
                                         axis=0)
    else:
        out["pipeline"] = graphs.encode(case.pixels.numpy())
    return out


def _passes(result: dict[str, Any], tol: Tolerance) -> bool:
    return math.isfinite(result["rel"]) and result["rel"] <= tol.rel and result["cosine"] >= tol.cosine


def verify_export(
    folder: str | os.PathLike,
    src: Any,
    dtype: str = "fp32",
    images: Sequence[PIL.Image.Image | str | os.PathLike] | None = None,
    progress: bool = True,
    providers: list[str] | None = None,
) -> dict[str, Any]:
    """Run the export in ``folder`` with onnxruntime against ``src`` (a VisionSource); raise past tolerance.

    Returns the ``verification`` section of ``export.json``.
    """
    tol = TOLERANCES[dtype]
    graphs = OnnxVisionGraphs(folder, providers=providers)  # what the runtime uses
    portable = None
    if graphs.optimized:  # the portable tower too (TensorRT's input), all tiles per call
        portable = OnnxVisionGraphs(folder, providers=providers, optimized=False, tile_batch=graphs.max_tiles)
    results, failures = [], []
    worst: dict[str, dict[str, float]] = {}
    for case in tqdm(verification_cases(src, images), desc="verify onnxruntime vs PyTorch", unit="case",
                     disable=not progress):
        ref = torch_reference(src, case)
        ort_out = _ort_outputs(graphs, case, ref, portable)
        outputs = {name: compare(ref[name.removesuffix("_portable")], out) for name, out in ort_out.items()}
        for name, r in outputs.items():
            w = worst.setdefault(name, {"rel": 0.0, "max_abs": 0.0, "cosine": 1.0})
            w["rel"], w["max_abs"] = max(w["rel"], r["rel"]), max(w["max_abs"], r["max_abs"])
            w["cosine"] = min(w["cosine"], r["cosine"])
            if not _passes(r, tol):
                failures.append(f"{case.name} / {name}: rel {r['rel']:.3g} (max-abs {r['max_abs']:.3g}), "
                                f"cosine {r['cosine']:.6f}")
        results.append({
            "name": case.name,
            "image_sizes": [list(s) for s in case.image_sizes],
            "tiles": int(case.pixels.shape[0]),
            "block_sizes": [list(b) if b is not None else None for b in case.block_sizes],
            "outputs": outputs,
        })
    used = {"vision_tower": graphs.graph_file("vision_tower").name, "tile_batch": graphs.tile_batch or graphs.max_tiles}
    if portable is not None:
        used["vision_tower_portable"] = portable.graph_file("vision_tower").name
    report = {
        "passed": not failures,
        "providers": graphs.active_providers,
        "graphs": used,
        "reference": "PyTorch eager, fp32, the model's own code (VisionTower, merge_features_for_dynamic_s2, "
        "split_chessboard, projector with quantized linears dequantized)",
        "tolerance": {**asdict(tol), "rel_definition": "max|onnxruntime - torch| / max|torch| per output"},
        "worst": worst,
        "cases": results,
    }
    if failures:
        raise VerificationError(
            f"onnxruntime differs from PyTorch past the {dtype} tolerance "
            f"(rel <= {tol.rel:g}, cosine >= {tol.cosine:g}): "
            + "; ".join(failures[:6]) + (f"; ... {len(failures) - 6} more" if len(failures) > 6 else "")
        )
    return report
