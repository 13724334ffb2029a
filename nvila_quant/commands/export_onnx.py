"""``nvila-export onnx``: the vision tower, S2 stage and projector as ONNX graphs, verified against PyTorch."""

from __future__ import annotations

import argparse

from nvila_quant.commands.common import add_dtype, add_model, add_output, add_overwrite, check_model_dir
from nvila_quant.io import check_output_dir

__all__ = ["register", "run", "summary"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "onnx",
        help="vision tower + S2 stage (+ projector) as ONNX graphs, verified against PyTorch",
        description="Write vision_tower.onnx (pixel tiles -> selected features; standard ONNX ops, what TensorRT "
        "builds from), vision_tower.ort.onnx (the same with attention and GELU fused into onnxruntime ops; what "
        "the runtime loads), s2.onnx (per-scale tile features -> merged multi-scale features split into the "
        "output block; dynamic-S2 models) and, with --include-projector, projector.onnx, plus export.json. "
        "Weights go to external .data files. The folder is written to a temporary sibling and renamed when "
        "export and verification succeed.",
    )
    add_model(p, help="NVILA checkpoint folder (config.json, vision_tower/, mm_projector/)")
    add_output(p, help="folder to create (must not exist unless --overwrite)")
    p.add_argument("--opset", type=int, default=18,
                   help="ONNX opset, 17..23 (default: 18, for onnxruntime and TensorRT 10; 23 adds a fused "
                   "Attention op, faster on onnxruntime CPU)")
    add_dtype(p, "fp32", choices=("fp32", "fp16"),
              help="weights and graph inputs/outputs (default: fp32). fp16 is verified against the fp32 PyTorch "
              "model with rel <= 2e-2 and cosine >= 0.999")
    p.add_argument("--include-projector", action="store_true",
                   help="also export projector.onnx (a quantized projector keeps its integer weights, "
                   "dequantized in the graph)")
    p.add_argument("--max-tiles", type=int, default=None,
                   help="largest tile batch the vision tower graph is declared for (TensorRT profile max; the "
                   "runtime splits larger batches). Default: the most tiles one image can have (17 on NVILA)")
    p.add_argument("--optimize", action=argparse.BooleanOptionalAction, default=True,
                   help="also write vision_tower.ort.onnx: attention and GELU fused into onnxruntime's "
                   "com.microsoft ops (MultiHeadAttention, FastGelu), exact, sharing vision_tower.onnx.data; "
                   "onnxruntime only (TensorRT uses vision_tower.onnx). Default: on")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="run onnxruntime against PyTorch on real images of several aspect ratios and fail past "
                   "tolerance (default: on)")
    p.add_argument("--verify-images", nargs="+", default=None, metavar="IMAGE",
                   help="images for --verify (default: built-in photos in four aspect ratios)")
    add_overwrite(p)
    p.set_defaults(func=run)


def summary(manifest: dict, output: str) -> str:
    """What was written, one line per graph, and the verification result."""
    lines = [f"wrote {output} (opset {manifest['opset']}, {manifest['dtype']}, max_tiles {manifest['max_tiles']})"]
    for spec in manifest["graphs"].values():
        if spec:
            ins = ", ".join(f"{i['name']}{i['shape']}" for i in spec["inputs"])
            outs = ", ".join(f"{o['name']}{o['shape']}" for o in spec["outputs"])
            lines.append(f"  {spec['file']:<21} {ins} -> {outs}")
    for spec in (manifest.get("optimized") or {}).values():
        fused = ", ".join(f"{n} {op}" for op, n in spec["fused_ops"].items())
        lines.append(f"  {spec['file']:<21} onnxruntime only ({fused}); TensorRT: {spec['source_graph']}")
    ver = manifest.get("verification")
    if ver:
        lines.append(f"  verified on {len(ver['cases'])} cases with {', '.join(ver['providers'])}: PASSED "
                     f"(tolerance rel <= {ver['tolerance']['rel']:g}, cosine >= {ver['tolerance']['cosine']:g})")
        for name, w in ver["worst"].items():
            lines.append(f"    {name:<21} worst max-abs {w['max_abs']:.3g}  rel {w['rel']:.3g}  "
                         f"cosine {w['cosine']:.8f}")
    else:
        lines.append("  not verified (--no-verify)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from nvila_quant.export import ExportOptions, export_onnx

    options = ExportOptions(  # validates opset, dtype, max_tiles
        opset=args.opset, dtype=args.dtype, include_projector=args.include_projector, max_tiles=args.max_tiles,
        optimize=args.optimize, verify=args.verify, verify_images=args.verify_images, overwrite=args.overwrite,
    )
    check_model_dir(args.model)
    check_output_dir(args.output, args.overwrite)
    manifest = export_onnx(args.model, args.output, options)
    print(summary(manifest, args.output))
    return 0
