"""``nvila-quant demo``: the whole pipeline on a built-in tiny model, offline, in a few minutes."""

from __future__ import annotations

import argparse

from nvila_quant.commands.common import add_device, add_overwrite


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the pipeline end to end on a tiny synthetic NVILA",
        description="Make a tiny synthetic NVILA with planted activation-outlier channels, quantize it with RTN and "
        "with AWQ (built-in image+caption calibration), export its vision side to ONNX and verify it, reload "
        "everything (packed int4 kernels, ONNX vision backend) and write a comparison report. Runs offline in a "
        "few minutes on 2 CPU cores. The model is synthetic: its answers are noise; the report shows how the "
        "methods compare relative to each other on outlier channels, not how a real NVILA performs.",
    )
    p.add_argument("--workdir", default="nvila-demo", help="folder for everything the demo writes "
                   "(default: ./nvila-demo)")
    add_overwrite(p, what="the workdir")
    add_device(p, default="cpu", help="device to run on (default: cpu)")
    p.add_argument("--n-samples", type=int, default=8, help="AWQ calibration conversations (default: 8)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed/memory part of the report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nvila_quant.demo import DemoSettings, run_demo

    run_demo(args.workdir, overwrite=args.overwrite,
             settings=DemoSettings(n_samples=args.n_samples, speed=not args.no_speed, device=args.device))
    return 0
