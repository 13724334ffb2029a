"""The command-line programs ``nvila-quant`` and ``nvila-export``, built by one builder.

Each command is a module under ``nvila_quant/commands/`` exposing ``register(subparsers)`` (adds its parser, with help
for every flag, and sets ``func``); :data:`PROGRAMS` lists each program's commands. Command modules import the heavy
parts of the package inside ``func``, so ``--help`` answers at once. Errors this package raises on purpose print as
one line (``<prog> <command>: error: ...``) and exit with status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from nvila_quant.errors import NVILAError

__all__ = ["PROGRAMS", "build_parser", "export_main", "main", "run"]

PROGRAMS: dict[str, tuple[str, list[str]]] = {
    "nvila-quant": (
        "Quantize, run and report on NVIDIA NVILA vision-language models.",
        ["make_tiny", "info", "generate", "compare", "eval", "awq", "rtn", "convert", "demo"],
    ),
    "nvila-export": (
        "Export NVILA's vision side (SigLIP tower, dynamic-S2 stage, projector) for deployment.",
        ["export_onnx"],
    ),
}


def build_parser(prog: str = "nvila-quant") -> argparse.ArgumentParser:
    """The parser of ``prog`` (a key of :data:`PROGRAMS`) with its commands registered."""
    description, commands = PROGRAMS[prog]
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in commands:
        importlib.import_module(f"nvila_quant.commands.{name}").register(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` with ``parser`` (sub-commands set ``func``), set up logging and run the command."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.func(args) or 0)
    except NVILAError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """``nvila-quant``."""
    return run(build_parser("nvila-quant"), argv)


def export_main(argv: Sequence[str] | None = None) -> int:
    """``nvila-export``."""
    return run(build_parser("nvila-export"), argv)


if __name__ == "__main__":
    sys.exit(main())
