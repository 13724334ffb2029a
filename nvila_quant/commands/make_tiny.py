"""``nvila-quant make-tiny OUT``: write a seeded synthetic NVILA checkpoint in the real layout."""

from __future__ import annotations

import argparse
import dataclasses

from nvila_quant.commands.common import add_dtype, add_output, add_overwrite
from nvila_quant.testing import TinySpec, make_tiny


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-tiny",
        help="write a tiny seeded NVILA checkpoint (for tests and the demo)",
        description="Write a tiny, seeded NVILA checkpoint in one of NVIDIA's layouts: a locally trained "
        "byte-level BPE tokenizer, SigLIP at 448 px / patch 14, a small GQA Qwen2 and the projector.",
    )
    add_output(p, help="folder to create (must not exist unless --overwrite)", positional=True)
    p.add_argument("--variant", choices=["nvila", "nvila-lite"], default="nvila",
                   help="nvila: dynamic S2 + 2x2 downsample projector; nvila-lite: dynamic tiling with thumbnail "
                   "+ 3x3 downsample projector (default: nvila)")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights and tokenizer corpus (default: 0)")
    p.add_argument("--outliers", action=argparse.BooleanOptionalAction, default=True,
                   help="plant function-preserving activation outlier channels, as trained LLMs have "
                   "(default: on)")
    p.add_argument("--llm-hidden", type=int, default=TinySpec.llm_hidden, help="LLM hidden size")
    p.add_argument("--llm-intermediate", type=int, default=TinySpec.llm_intermediate, help="LLM MLP width")
    p.add_argument("--llm-layers", type=int, default=TinySpec.llm_layers, help="number of decoder layers")
    p.add_argument("--llm-heads", type=int, default=TinySpec.llm_heads, help="attention heads")
    p.add_argument("--llm-kv-heads", type=int, default=TinySpec.llm_kv_heads, help="KV heads (GQA)")
    add_dtype(p, "bf16", help="dtype of the stored weights (default: bf16, as NVIDIA ships)")
    p.add_argument("--layout", choices=["vila", "hf"], default="vila",
                   help="vila: three folders (llm/, vision_tower/, mm_projector/), as VILA saves them; hf: one flat "
                   "set of prefixed shards with tokenizer, processor and remote code at the root, as NVIDIA's -hf "
                   "repositories (default: vila)")
    add_overwrite(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = TinySpec(
        variant=args.variant, seed=args.seed, outliers=args.outliers, llm_hidden=args.llm_hidden,
        llm_intermediate=args.llm_intermediate, llm_layers=args.llm_layers, llm_heads=args.llm_heads,
        llm_kv_heads=args.llm_kv_heads, dtype=args.dtype,
    )
    out = make_tiny(args.output, spec, overwrite=args.overwrite, layout=args.layout)
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    shown = ", ".join(f"{k}={v}" for k, v in list(fields.items())[:3])
    print(f"wrote {spec.variant} checkpoint ({args.layout} layout) to {out} ({shown})")
    return 0
