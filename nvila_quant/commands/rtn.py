"""``nvila-quant rtn``: the round-to-nearest baseline, in the same layout and formats as ``awq``."""

from __future__ import annotations

import argparse

from tqdm.contrib.logging import logging_redirect_tqdm

from nvila_quant.commands.awq import config_from_args, quantizer_flags, report
from nvila_quant.quant.runner import quantize

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rtn",
        help="round-to-nearest baseline with the same outputs as awq",
        description="Round-to-nearest quantization of NVILA's LLM and projector (no calibration), written in the "
        "same NVILA layout and formats as `nvila-quant awq`.",
    )
    quantizer_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with logging_redirect_tqdm():
        result = quantize(args.model, config_from_args(args, "rtn"), None, args.output, overwrite=args.overwrite,
                          progress=not args.quiet, layout=args.layout)
    report(result)
    return 0
