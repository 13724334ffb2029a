"""Run an `nvila-export onnx` folder with onnxruntime alone: image -> NVILA vision features.

    python export/run_onnxruntime.py EXPORT_DIR photo.jpg [--provider cuda|cpu] [--out features.npy]

Needs only numpy, Pillow and onnxruntime (or onnxruntime-gpu); nvila_quant is NOT imported. Everything it
needs comes from EXPORT_DIR/export.json: tile size, normalization, S2 scales, graph input names.

Steps for one image (dynamic S2, NVILA):
  1. tiles: the image resized to each S2 scale but the last as a square (1 tile at 448, 4 at 896), then to
     the (cols x rows) grid of the last scale whose aspect ratio is closest to the image's; 448 px tiles,
     row-major; normalized (x / 255 - mean) / std, CHW.
  2. vision_tower.ort.onnx (or vision_tower.onnx when the export has no onnxruntime graph, see
     export.json "runtimes"): pixel_values [num_tiles, 3, 448, 448] -> features [num_tiles, 1024, C]; on CPU
     one tile per call (faster: each GEMM's activations stay in cache), on GPU up to max_tiles per call.
  3. s2.onnx: features_448 [1, 1024, C], features_896 [4, 1024, C], features_1344 [rows, cols, 1024, C]
     -> s2_features [rows*cols, 1024, 3C] (the block size is the shape of the last input).
  4. projector.onnx (if exported): [rows*cols, 1024, 3C] -> [rows*cols, 256, H]; the blocks are merged back
     into one (rows*16) x (cols*16) grid: (tokens, H), the image's embeddings for the LLM.
NVILA-Lite (no s2 graph): InternVL tiles plus a thumbnail, each tile through the tower and projector.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image


# ---------------------------------------------------------------------------- tiling (mirrors nvila_quant.model.media)
def target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    ratios = {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
              if min_num <= i * j <= max_num}
    return sorted(ratios, key=lambda r: r[0] * r[1])


def closest_grid(width: int, height: int, ratios: list[tuple[int, int]], size: int) -> tuple[int, int]:
    """(cols, rows) closest to the image's aspect ratio; ties go to the larger grid for large images."""
    aspect, best_diff, best = width / height, float("inf"), (1, 1)
    for ratio in ratios:
        diff = abs(aspect - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and width * height > 0.5 * size * size * ratio[0] * ratio[1]:
            best = ratio
    return best


def crop_grid(image: Image.Image, cols: int, rows: int, size: int) -> list[Image.Image]:
    resized = image.resize((size * cols, size * rows), Image.BICUBIC)
    return [resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
            for r in range(rows) for c in range(cols)]


def tile_image(image: Image.Image, manifest: dict) -> tuple[list[Image.Image], tuple[int, int] | None]:
    """NVILA's tiles of one image and its last-scale block (rows, cols); block None for NVILA-Lite tiles."""
    vision = manifest["vision"]
    size, max_num, scales = vision["image_size"], vision["max_tiles_per_image"], vision["s2_scales"]
    if scales:  # dynamic S2
        tiles = []
        for scale in scales[:-1]:
            n = scale // scales[0]
            tiles += crop_grid(image, n, n, size)
        min_num = (scales[-1] // scales[0]) ** 2
        cols, rows = closest_grid(*image.size, target_ratios(min_num, max_num), size)
        return tiles + crop_grid(image, cols, rows, size), (rows, cols)
    if vision["preprocessing"]["tiling"] == "dynamic":  # NVILA-Lite: InternVL tiles + thumbnail
        cols, rows = closest_grid(*image.size, target_ratios(1, max_num), size)
        tiles = crop_grid(image, cols, rows, size)
        return tiles + ([image.resize((size, size), Image.BICUBIC)] if len(tiles) > 1 else []), None
    return [image.resize((size, size), Image.BICUBIC)], None


def normalize(tiles: list[Image.Image], manifest: dict) -> np.ndarray:
    """PIL tiles -> (N, 3, S, S) float32, (x * rescale - mean) / std."""
    pre = manifest["vision"]["preprocessing"]
    x = np.stack([np.asarray(t.convert("RGB"), dtype=np.float32) for t in tiles]) * pre["rescale_factor"]
    x = (x - np.asarray(pre["image_mean"], np.float32)) / np.asarray(pre["image_std"], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# ---------------------------------------------------------------------------- graphs
class VisionGraphs:
    """The export's graphs as onnxruntime sessions."""

    def __init__(self, folder: str | Path, providers: list[str]) -> None:
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "export.json").read_text())
        self.dtype = np.float16 if self.manifest["dtype"] == "fp16" else np.float32
        # onnxruntime's files (the fused tower when there is one); older exports have no "runtimes"
        files = (self.manifest.get("runtimes") or {}).get("onnxruntime") or {
            name: spec["file"] for name, spec in self.manifest["graphs"].items() if spec
        }
        self.sessions = {name: ort.InferenceSession(str(self.folder / f), providers=providers)
                         for name, f in files.items()}
        on_cpu = providers[0] == "CPUExecutionProvider"
        self.tile_batch = 1 if on_cpu else self.manifest["max_tiles"]

    def run(self, name: str, *arrays: np.ndarray) -> np.ndarray:
        names = [i["name"] for i in self.manifest["graphs"][name]["inputs"]]
        feeds = {n: np.ascontiguousarray(a, dtype=self.dtype) for n, a in zip(names, arrays, strict=True)}
        return self.sessions[name].run(None, feeds)[0]

    def encode(self, pixels: np.ndarray, block: tuple[int, int] | None) -> np.ndarray:
        """One image's tiles -> its vision features (see the module docstring)."""
        step = self.tile_batch
        features = np.concatenate([self.run("vision_tower", pixels[i : i + step])
                                   for i in range(0, len(pixels), step)])  # (N, T, C)
        scales = self.manifest["vision"]["s2_scales"]
        if scales:
            counts = [(s // scales[0]) ** 2 for s in scales[:-1]] + [block[0] * block[1]]
            parts = np.split(features, np.cumsum(counts)[:-1])
            parts[-1] = parts[-1].reshape(block[0], block[1], *features.shape[1:])  # (rows, cols, T, C)
            features = self.run("s2", *parts)  # (rows*cols, T, 3C)
        if "projector" not in self.sessions:
            return features
        out = self.run("projector", features)  # (blocks, T', H)
        if not scales:
            return out
        if self.manifest["vision"]["s2_resize_output_to_scale_idx"] % len(scales) != len(scales) - 1:
            raise NotImplementedError("this recipe merges blocks for s2_resize_output_to_scale_idx = -1 (NVILA's)")
        rows, cols = block
        side = math.isqrt(out.shape[1])
        grid = out.reshape(rows, cols, side, side, -1).transpose(0, 2, 1, 3, 4)  # merge_chessboard
        return grid.reshape(rows * side * cols * side, -1)  # (tokens, H)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", help="folder written by `nvila-export onnx`")
    parser.add_argument("image", help="an image file")
    parser.add_argument("--provider", choices=["auto", "cuda", "cpu"], default="auto",
                        help="execution provider (auto: CUDA when onnxruntime-gpu sees a GPU)")
    parser.add_argument("--out", default=None, help="save the features as .npy")
    args = parser.parse_args()
    if args.provider == "cpu" or (args.provider == "auto" and ort.get_device() != "GPU"):
        providers = ["CPUExecutionProvider"]
    else:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    graphs = VisionGraphs(args.export_dir, providers)
    tiles, block = tile_image(Image.open(args.image).convert("RGB"), graphs.manifest)
    pixels = normalize(tiles, graphs.manifest)
    start = time.perf_counter()
    features = graphs.encode(pixels, block)
    ms = (time.perf_counter() - start) * 1000
    print(f"{args.image}: {len(tiles)} tiles, block {block} -> features {list(features.shape)} {features.dtype} "
          f"in {ms:.0f} ms ({graphs.sessions['vision_tower'].get_providers()[0]})")
    if args.out:
        np.save(args.out, features)


if __name__ == "__main__":
    main()
