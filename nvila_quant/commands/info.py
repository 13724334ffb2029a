"""``nvila-quant info [DIR] [--kernels]``: a checkpoint's layout, sizes, dtypes and quantization; which int4 kernel
runs where on this machine."""

from __future__ import annotations

import argparse
import json

from nvila_quant.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="describe a checkpoint (layout, sizes, dtypes, quantization) and/or this machine's int4 kernels",
        description="Describe an NVILA checkpoint from its configs and safetensors headers (no weights are "
        "loaded): sub-folders, tensor and element counts, bytes on disk, dtypes and quantization status. With "
        "--kernels, describe this machine instead: per device and activation dtype, which int4 kernel each "
        "token-count range takes and why a faster one is not taken (this builds the native kernels if needed).",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="NVILA checkpoint folder (config.json, llm/, vision_tower/, mm_projector/)")
    p.add_argument("--kernels", action="store_true", help="describe the int4 kernels of this machine")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.model is None and not args.kernels:
        raise ConfigError("give a checkpoint folder, --kernels, or both")
    out = {}
    if args.model is not None:
        from nvila_quant.model.summary import describe_checkpoint, format_description

        out["checkpoint"] = describe_checkpoint(args.model)
        if not args.json:
            print(format_description(out["checkpoint"]))
    if args.kernels:
        from nvila_quant.kernels.inventory import describe_kernels, format_kernels

        out["kernels"] = describe_kernels()
        if not args.json:
            print(format_kernels(out["kernels"]))
    if args.json:
        print(json.dumps(out["checkpoint"] if list(out) == ["checkpoint"] else out, indent=2))
    return 0
