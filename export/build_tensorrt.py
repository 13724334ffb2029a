"""TensorRT engines from an `nvila-export onnx` folder: prints (or runs) one `trtexec` command per graph.

    python export/build_tensorrt.py EXPORT_DIR [--fp16] [--run] [--trtexec /usr/src/tensorrt/bin/trtexec]

TensorRT builds from the portable graphs listed under export.json "graphs" (standard ONNX ops:
vision_tower.onnx, s2.onnx, projector.onnx), never from vision_tower.ort.onnx, whose com.microsoft ops
(MultiHeadAttention, FastGelu) only onnxruntime implements. Shape profiles come from export.json (documented,
not run in this project's CI: it needs an NVIDIA GPU and TensorRT):
- vision_tower: pixel_values  min 1 tile, opt = max = max_tiles (17 on NVILA: 1 + 4 + up to 12 tiles).
- s2:           features_1344 ["rows", "cols", T, C] from 1x1 to max_tiles_per_image on each side (the grid
                always has rows*cols <= max_tiles_per_image; opt 3x4); the other scales are static.
- projector:    x ["num_blocks", T, S*C] from 1 to max(max_tiles_per_image, max_tiles) blocks.
A quantized projector dequantizes uint8 codes in the graph; fold that into float weights first if your
TensorRT rejects uint8 initializers: `polygraphy surgeon sanitize projector.onnx --fold-constants -o
projector.folded.onnx` (the script prints that step when the projector is quantized).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
from pathlib import Path


def _dims(shape: list, values: dict[str, int]) -> str:
    return "x".join(str(values[d] if isinstance(d, str) else d) for d in shape)


def profiles(manifest: dict) -> dict[str, dict[str, dict[str, int]]]:
    """Per graph: {"min" | "opt" | "max": {symbolic dim: size}}."""
    per_image = manifest["vision"]["max_tiles_per_image"]
    max_tiles = manifest["max_tiles"]
    return {
        "vision_tower": {k: {"num_tiles": v} for k, v in (("min", 1), ("opt", max_tiles), ("max", max_tiles))},
        "s2": {"min": {"rows": 1, "cols": 1}, "opt": {"rows": 3, "cols": 4},
               "max": {"rows": per_image, "cols": per_image}},
        "projector": {"min": {"num_blocks": 1}, "opt": {"num_blocks": 12},
                      "max": {"num_blocks": max(per_image, max_tiles)}},
    }


def commands(folder: Path, fp16: bool, trtexec: str) -> list[list[str]]:
    manifest = json.loads((folder / "export.json").read_text())
    out = []
    for name, spec in manifest["graphs"].items():
        if not spec:
            continue
        onnx_file = folder / spec["file"]
        if name == "projector" and (manifest.get("projector") or {}).get("quantized_linears"):
            folded = folder / "projector.folded.onnx"
            out.append(["polygraphy", "surgeon", "sanitize", str(onnx_file), "--fold-constants", "-o", str(folded)])
            onnx_file = folded
        cmd = [trtexec, f"--onnx={onnx_file}", f"--saveEngine={folder / (name + '.plan')}"]
        prof = profiles(manifest)[name]
        for key in ("min", "opt", "max"):
            shapes = [f"{i['name']}:{_dims(i['shape'], prof[key])}" for i in spec["inputs"]]
            cmd.append(f"--{key}Shapes=" + ",".join(shapes))
        if fp16 and manifest["dtype"] == "fp32":
            cmd.append("--fp16")  # let TensorRT pick fp16 kernels (an fp16 export already is fp16)
        out.append(cmd)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", help="folder written by `nvila-export onnx`")
    parser.add_argument("--fp16", action="store_true", help="build fp16 engines from an fp32 export")
    parser.add_argument("--trtexec", default="trtexec", help="path of trtexec (default: on PATH)")
    parser.add_argument("--run", action="store_true", help="run the commands instead of printing them")
    args = parser.parse_args()
    for cmd in commands(Path(args.export_dir), args.fp16, args.trtexec):
        print(shlex.join(cmd))
        if args.run:
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
