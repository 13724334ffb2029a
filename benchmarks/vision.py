"""Vision + S2 latency per image on CPU: PyTorch eager vs onnxruntime (the `nvila-export onnx` graphs), fp32, same run.

    python benchmarks/vision.py [--repeats 5] [--threads 1] [--opset 18 23] [--torch-per-tile] [--vision-layers 6 ...]

Model: a synthetic NVILA (make-tiny) whose vision tower has SigLIP-so400m's exact layer shape (hidden 1152,
MLP 4304, 16 heads, 448 px / patch 14: 1024 tokens per tile) but 3 layers (2 used) instead of 27 (26 used), so
each layer costs what NVILA's does and a run stays short on 2 cores; the real tower is about 13x deeper. Both
sides start from the same
preprocessed pixel tiles of real photos (dynamic S2: 14 or 17 tiles per image) and end at the S2 features that
feed the projector. PyTorch: ``VisionTower`` + ``merge_features_for_dynamic_s2`` + ``split_chessboard``, all
tiles in one call as the runtime runs it (``--torch-per-tile`` adds PyTorch one tile per call, for reference).
onnxruntime (CPUExecutionProvider), per exported opset:
- ``ort-o18``: what the runtime loads: ``vision_tower.ort.onnx`` (fused MultiHeadAttention/FastGelu) when the
  export wrote one, one tile per tower call, then ``s2.onnx``;
- ``ort-o18-portable``: the portable ``vision_tower.onnx`` (TensorRT's input) with all tiles in one call, as
  the runtime ran it before the optimized graph existed.
Runs alternate (PyTorch, then each onnxruntime variant, 50 ms apart so idle threads stop spinning) so
background load hits all sides alike;
the minimum (best of N, the robust statistic under background load) and the median per image are reported, and
the speed-up is the ratio of minima. ``--threads 1`` also reports each side's CPU time (robust on a busy
machine). Writes one result file per run, benchmarks/results/vision/<time>-<machine>[-<variant>].json, with every
timed run per image and backend (``runs_s``, ``thread_cpu_s``) next to the minima and medians.

``--w8a8`` adds the tower quantized W8A8 (``nvila-quant awq --targets vision_tower``'s SmoothQuant search and int8
linears, calibrated on the first image's tiles, ``torch._int_mm``; norms and attention in bf16, as a bf16 checkpoint
runs) and a bf16 copy of the float tower, and reports
W8A8 against the faster float eager path (issue 22's goal: >= 1.5x) with its features' cosine to fp32.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_results_arg, table, write_result  # noqa: E402

from nvila_quant.export import ExportOptions, default_max_tiles, export_onnx, load_vision_source  # noqa: E402
from nvila_quant.model.media import dynamic_s2_preprocess, load_image  # noqa: E402
from nvila_quant.model.onnx_vision import OnnxVisionGraphs  # noqa: E402
from nvila_quant.model.vision import merge_features_for_dynamic_s2, split_chessboard  # noqa: E402
from nvila_quant.paths import builtin_calib_dir  # noqa: E402
from nvila_quant.quant.vision import VisionQuantConfig, quantize_tower  # noqa: E402
from nvila_quant.testing.factory import TinySpec, make_tiny  # noqa: E402

RUNTIME = "ort-o{}"  # the runtime's default way to run an export, per opset

IMAGES = ("astronaut.jpg", "coffee.jpg")  # 1:1 -> 14 tiles (3x3 block), 3:2 -> 17 tiles (3x4 block)


@torch.inference_mode()
def torch_vision_s2(src, pixels: torch.Tensor, block: tuple[int, int], tile_batch: int | None = None) -> torch.Tensor:
    """encode_images up to the projector: (tiles, 3, S, S) -> (rows*cols, T, 3C); tower in calls of tile_batch."""
    cfg = src.config
    features = src.tower(pixels) if tile_batch is None else torch.cat(
        [src.tower(pixels[i : i + tile_batch]) for i in range(0, pixels.shape[0], tile_batch)]
    )  # (tiles, T, C)
    merged, blocks = merge_features_for_dynamic_s2(features, [block], cfg.s2_scales, cfg.s2_resize_output_to_scale_idx)
    return rearrange(split_chessboard(merged[0], *blocks[0]), "b c h w -> b (h w) c")


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this thread, result). With --threads 1 both backends compute on this
    thread, so its CPU time is the work done, whatever else the machine runs."""
    time.sleep(0.05)  # let the other backend's worker threads stop spinning
    w, c = time.perf_counter(), time.thread_time()
    out = fn()
    return time.perf_counter() - w, time.thread_time() - c, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per image and backend; median kept")
    parser.add_argument("--opset", type=int, nargs="+", default=[18], help="opsets to export and time (default: 18)")
    parser.add_argument("--torch-per-tile", action="store_true",
                        help="also time PyTorch with one tile per tower call (what onnxruntime does on CPU)")
    parser.add_argument("--vision-hidden", type=int, default=1152, help="SigLIP hidden size (so400m: 1152)")
    parser.add_argument("--vision-intermediate", type=int, default=4304, help="SigLIP MLP width (so400m: 4304)")
    parser.add_argument("--vision-layers", type=int, default=3,
                        help="SigLIP layers; NVILA uses all but the last (so400m: 27)")
    parser.add_argument("--vision-heads", type=int, default=16, help="attention heads (so400m: 16)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both backends (default: all cores); 1 also reports CPU time, which "
                        "background load does not inflate")
    parser.add_argument("--variant", "--name", default=None,
                        help="a label for this configuration, kept in the result file and its name (default: none)")
    parser.add_argument("--w8a8", action="store_true",
                        help="also the W8A8 tower (SmoothQuant search on the first image's tiles) and a bf16 tower")
    add_results_arg(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    spec = TinySpec(seed=0, outliers=False, vision_hidden=args.vision_hidden,
                    vision_intermediate=args.vision_intermediate,
                    vision_layers=args.vision_layers, vision_heads=args.vision_heads, dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny(Path(tmp) / "ckpt", spec)
        src = load_vision_source(ckpt)
        graphs: dict[str, OnnxVisionGraphs] = {}
        for opset in args.opset:
            out = Path(tmp) / f"onnx-{opset}"
            export_onnx(src, out, ExportOptions(opset=opset, verify=False), progress=False)
            cpu = ["CPUExecutionProvider"]
            graphs[RUNTIME.format(opset)] = OnnxVisionGraphs(out, providers=cpu, threads=threads)
            graphs[RUNTIME.format(opset) + "-portable"] = OnnxVisionGraphs(
                out, providers=cpu, threads=threads, optimized=False, tile_batch=default_max_tiles(src.config))
        sides = {"torch": lambda p, b: torch_vision_s2(src, p, b).numpy()}
        if args.torch_per_tile:
            sides["torch-tile1"] = lambda p, b: torch_vision_s2(src, p, b, tile_batch=1).numpy()
        sides.update({k: (lambda p, b, g=g: g.encode(p.numpy(), b)) for k, g in graphs.items()})
        w8a8_log = None
        if args.w8a8:
            tiles, _ = dynamic_s2_preprocess(load_image(builtin_calib_dir() / IMAGES[0]), src.config.s2_scales,
                                             src.config.max_tiles, src.tower.image_size)
            calib = src.tower.image_processor(tiles, return_tensors="pt")["pixel_values"].float()
            bf16 = types.SimpleNamespace(config=src.config, tower=copy.deepcopy(src.tower).to(torch.bfloat16))
            int8 = types.SimpleNamespace(config=src.config, tower=copy.deepcopy(src.tower).to(torch.bfloat16))
            with torch.inference_mode():
                w8a8_log = quantize_tower(int8.tower, calib, VisionQuantConfig(), progress=False).log
            sides["torch-bf16"] = lambda p, b: torch_vision_s2(bf16, p, b).float().numpy()
            sides["torch-w8a8"] = lambda p, b: torch_vision_s2(int8, p, b).float().numpy()
        graph_files = {k: g.graph_file("vision_tower").name + f" (tiles per call: {g.tile_batch})"
                       for k, g in graphs.items()}

        rows, results = [], []
        for name in IMAGES:
            tiles, block = dynamic_s2_preprocess(load_image(builtin_calib_dir() / name), src.config.s2_scales,
                                                 src.config.max_tiles, src.tower.image_size)
            pixels = src.tower.image_processor(tiles, return_tensors="pt")["pixel_values"].float()
            for run in sides.values():
                run(pixels, block)  # warm-up (session creation, first-run allocations)
            ref = sides["torch"](pixels, block)
            times: dict[str, list[float]] = {k: [] for k in sides}
            cpu: dict[str, list[float]] = {k: [] for k in sides}
            diffs: dict[str, float] = {}
            cosines = {k: float(torch.nn.functional.cosine_similarity(
                torch.from_numpy(np.asarray(run(pixels, block))).flatten().double(),
                torch.from_numpy(ref).flatten().double(), dim=0)) for k, run in sides.items()}
            for _ in range(args.repeats):
                for k, run in sides.items():
                    dt, ct, out = timed(lambda run=run: run(pixels, block))  # noqa: B023
                    times[k].append(dt)
                    cpu[k].append(ct)
                    diffs[k] = float(np.abs(out - ref).max() / np.abs(ref).max())
            best = {k: min(v) for k, v in times.items()}
            med = {k: statistics.median(v) for k, v in times.items()}
            best_cpu = {k: min(v) for k, v in cpu.items()}
            entry = {"image": name, "tiles": len(tiles), "block": list(block), "min_s": best, "median_s": med,
                     "thread_cpu_min_s": best_cpu, "runs_s": times, "thread_cpu_s": cpu, "rel_diff_vs_torch": diffs,
                     "cosine_vs_torch": cosines}
            results.append(entry)
            for k in times:
                rows.append({"image": name, "tiles": len(tiles), "backend": k, "min_ms": best[k] * 1000,
                             "median_ms": med[k] * 1000, "speedup_min": best["torch"] / best[k],
                             "speedup_median": med["torch"] / med[k], "cpu_ms": best_cpu[k] * 1000,
                             "speedup_cpu": best_cpu["torch"] / best_cpu[k], "rel_diff": diffs.get(k, 0.0)})

    columns = ["image", "tiles", "backend", "min_ms", "median_ms", "speedup_min", "speedup_median", "rel_diff"]
    if threads == 1:
        columns[-1:-1] = ["cpu_ms", "speedup_cpu"]
    print(table(rows, columns))
    summary = {}
    for key in [k for k in sides if k.startswith("ort-")]:
        ratio = statistics.median(r["min_s"]["torch"] / r["min_s"][key] for r in results)
        ratio_med = statistics.median(r["median_s"]["torch"] / r["median_s"][key] for r in results)
        ratio_cpu = statistics.median(r["thread_cpu_min_s"]["torch"] / r["thread_cpu_min_s"][key] for r in results)
        summary[key] = {"speedup_min": ratio, "speedup_median": ratio_med, "goal_1.2x_met": None}
        if threads == 1:
            summary[key]["speedup_thread_cpu"] = ratio_cpu
        robust = ratio_cpu if threads == 1 else min(ratio, ratio_med)  # best-of-N alone flatters a noisy side
        verdict = "meets" if robust >= 1.2 else "MISSES"
        summary[key]["goal_1.2x_met"] = robust >= 1.2
        extra = f"; {ratio_cpu:.2f}x in CPU time" if threads == 1 else ""
        print(f"{key} vs PyTorch eager: {ratio:.2f}x faster (best of {args.repeats}; "
              f"{ratio_med:.2f}x on medians{extra}; goal >= 1.2x on the "
              f"{'CPU-time' if threads == 1 else 'lower wall-clock'} ratio: {verdict})")
    if "torch-w8a8" in sides:
        best_float = [min(r["min_s"]["torch"], r["min_s"]["torch-bf16"]) for r in results]
        ratio = statistics.median(f / r["min_s"]["torch-w8a8"] for f, r in zip(best_float, results, strict=True))
        cos = min(r["cosine_vs_torch"]["torch-w8a8"] for r in results)
        summary["torch-w8a8"] = {"speedup_vs_best_float_eager": ratio, "goal_1.5x_met": ratio >= 1.5,
                                 "min_cosine_vs_fp32": cos, "search": w8a8_log}
        print(f"torch-w8a8 vs the faster of PyTorch fp32 / bf16 eager: {ratio:.2f}x (best of {args.repeats}; goal "
              f">= 1.5x: {'meets' if ratio >= 1.5 else 'MISSES'}); features' cosine to fp32 >= {cos:.5f}")
    if threads != 1:
        print("wall clock follows the machine's background load; `--threads 1` adds CPU-time ratios, which it "
              "does not inflate")
    path = write_result("vision", {
        "benchmark": "vision tower + dynamic S2 per image, CPU, fp32",
        "spec": {k: getattr(spec, k) for k in ("vision_hidden", "vision_intermediate", "vision_layers", "vision_heads",
                                                "image_size", "patch_size")},
        "threads": threads, "repeats": args.repeats, "graphs": graph_files, "results": results,
        "speedup_vs_torch": summary,
    }, args.variant, "cpu", args.results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
