"""``nvila-quant info DIR``: layout, parameter counts, dtypes and quantization status of a checkpoint."""

from __future__ import annotations

import argparse
import json

from nvila_quant.commands.common import add_model
from nvila_quant.model.summary import describe_checkpoint, format_description


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="describe a checkpoint (layout, sizes, dtypes, quantization)",
        description="Describe an NVILA checkpoint from its configs and safetensors headers (no weights are "
        "loaded): sub-folders, tensor and element counts, bytes on disk, dtypes and quantization status.",
    )
    add_model(p, positional=True)
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    d = describe_checkpoint(args.model)
    print(json.dumps(d, indent=2) if args.json else format_description(d))
    return 0
