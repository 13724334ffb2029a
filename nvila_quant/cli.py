"""``nvila-quant``: the command-line entry point.

Each sub-command lives in its own module under ``nvila_quant/commands/`` exposing
``register(subparsers)`` (adds its parser, with help for every flag, and sets ``func``) and is listed in
``COMMANDS`` below. Errors this package raises on purpose print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from nvila_quant.errors import NVILAError

__all__ = ["COMMANDS", "build_parser", "main", "run"]

COMMANDS = [
    "nvila_quant.commands.make_tiny",
    "nvila_quant.commands.info",
    "nvila_quant.commands.generate",
    "nvila_quant.commands.compare",
    "nvila_quant.commands.awq",
    "nvila_quant.commands.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nvila-quant",
        description="Quantize, run and report on NVIDIA NVILA vision-language models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` with ``parser`` (sub-commands set ``func``), set up logging and run the command.

    Errors this package raises on purpose print as one line (``<prog> <command>: error: ...``) and return 2;
    Ctrl-C returns 130. Shared by ``nvila-quant`` and ``nvila-export``."""
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
    return run(build_parser(), argv)

if __name__ == "__main__":
    sys.exit(main())
