"""``nvila-quant convert``: rewrite an NVILA checkpoint in the layout an engine loads (a pure repack)."""

from __future__ import annotations

import argparse

from nvila_quant.commands.common import add_model, add_output, add_overwrite, add_quiet

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="rewrite a float or quantized checkpoint as -hf (SGLang), three folders (vLLM's llm/) or TensorRT-LLM",
        description="Rewrite an NVILA checkpoint (three-folder or flat -hf, float or quantized) in the layout an "
        "engine loads. int4 codes are repacked bit exactly; what the target cannot express is refused, with the "
        "reason, before any file is written.",
    )
    add_model(p, help="NVILA checkpoint folder, either layout (three folders, or a flat -hf checkpoint)")
    add_output(p, help="folder to create (written to a temporary folder and renamed when complete)")
    p.add_argument("--to", required=True, choices=["hf", "vila", "trtllm"],
                   help="hf: flat -hf layout with remote code, which SGLang serves with --trust-remote-code; "
                   "vila: the three folders (this runtime; OUT/llm is a plain Qwen2 folder vLLM serves); trtllm: the "
                   "three folders with a ModelOpt W4A16_AWQ LLM (symmetric int4 only) for TensorRT-LLM")
    p.add_argument("--format", choices=["autoawq", "compressed-tensors"], default=None,
                   help="--to hf only: the LLM's int4 format (default: the source's; tinychat becomes autoawq)")
    add_overwrite(p)
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nvila_quant.export.convert import convert

    manifest = convert(args.model, args.output, args.to, fmt=args.format, overwrite=args.overwrite,
                       progress=not args.quiet)
    print(f"wrote {args.output} ({args.to} layout)")
    for note in manifest.get("notes", []):
        print(f"  {note}")
    return 0
