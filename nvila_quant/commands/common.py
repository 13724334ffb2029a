"""Flags and checks shared by the commands: one spelling and one help text for each common flag.

    --model DIR   --output DIR   --overwrite   --device DEV   --dtype fp32|fp16|bf16   --quiet

``--dtype`` takes ``fp32|fp16|bf16`` everywhere (``float32|float16|bfloat16`` are accepted too and read as the short
names); commands that can pick one from the checkpoint also take ``auto``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nvila_quant.errors import CheckpointError

__all__ = [
    "DTYPES",
    "add_device",
    "add_dtype",
    "add_model",
    "add_output",
    "add_overwrite",
    "add_quiet",
    "check_model_dir",
    "dtype_choice",
]

DTYPES = ("fp32", "fp16", "bf16")
_LONG_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def dtype_choice(allowed: tuple[str, ...]):  # noqa: ANN201 (an argparse type function)
    """An argparse ``type`` reading a dtype name (long spellings too) as one of ``allowed``."""

    def parse(value: str) -> str:
        name = _LONG_NAMES.get(value.lower(), value.lower())
        if name not in allowed:
            raise argparse.ArgumentTypeError(
                f"invalid choice {value!r} (choose from {', '.join(allowed)}; float32, float16 and bfloat16 are "
                "accepted too)"
            )
        return name

    parse.__name__ = "dtype"
    return parse


def add_model(p: argparse.ArgumentParser, help: str = "NVILA checkpoint folder (config.json, llm/, vision_tower/, "
              "mm_projector/)", positional: bool = False) -> None:
    if positional:
        p.add_argument("model", help=help)
    else:
        p.add_argument("--model", required=True, help=help)


def add_output(p: argparse.ArgumentParser, help: str, default: str | None = None, positional: bool = False) -> None:
    if positional:
        p.add_argument("output", help=help)
    else:
        p.add_argument("--output", required=default is None, default=default, help=help)


def add_overwrite(p: argparse.ArgumentParser, what: str = "OUTPUT") -> None:
    p.add_argument("--overwrite", action="store_true", help=f"replace {what} if it exists")


def add_device(p: argparse.ArgumentParser, default: str | None = None,
               help: str = "cpu, cuda or cuda:N (default: cuda when present)") -> None:
    p.add_argument("--device", default=default, help=help)


def add_dtype(p: argparse.ArgumentParser, default: str | None, help: str, choices: tuple[str, ...] = DTYPES,
              auto: bool = False) -> None:
    allowed = (("auto",) if auto else ()) + tuple(choices)
    p.add_argument("--dtype", type=dtype_choice(allowed), default=default, metavar="{" + ",".join(allowed) + "}",
                   help=help)


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def check_model_dir(model: str | Path) -> Path:
    """Fail before any slow step when ``model`` is not a checkpoint folder."""
    path = Path(model)
    if not path.exists():
        raise CheckpointError(f"model folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: not an NVILA checkpoint folder")
    return path
