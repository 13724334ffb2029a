"""``nvila-quant demo``: the whole pipeline on a built-in tiny model, offline, in a few minutes."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the pipeline end to end on a tiny synthetic NVILA",
        description="Make a tiny synthetic NVILA with planted activation outliers, describe it, answer a "
        "question about a built-in photo (streamed through the KV-cached runtime) and time the runtime. "
        "Runs offline. The model is synthetic: its answers are noise and its numbers only show that the "
        "pipeline works, not how a real NVILA behaves.",
    )
    p.add_argument("--workdir", default="nvila-demo", help="folder for everything the demo writes "
                   "(default: ./nvila-demo)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing workdir")
    p.add_argument("--device", default="cpu", help="device to run on (default: cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nvila_quant.demo import run_demo

    run_demo(args.workdir, overwrite=args.overwrite, device=args.device)
    return 0
