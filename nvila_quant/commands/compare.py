"""``nvila-quant compare``: a report of quantized candidates against the float reference."""

from __future__ import annotations

import argparse

from nvila_quant.commands.common import add_device, add_dtype, add_output, add_overwrite
from nvila_quant.commands.eval import add_benchmark_flags, print_deltas


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="accuracy / speed / size report of candidates vs the float reference",
        description="Compare quantized checkpoints with the float model they came from, on held-out data: "
        "KL and argmax agreement of next-token distributions, perplexities, visual-token cosine, greedy "
        "generations side by side, speed (vision encode, TTFT, decode tok/s, peak memory) and size per "
        "component, each as a candidate/reference ratio. Writes report.md, report.json and PNG plots.",
    )
    p.add_argument("--reference", required=True, help="the float NVILA checkpoint")
    p.add_argument("--candidate", action="append", required=True, metavar="DIR",
                   help="a quantized checkpoint made from the reference (repeatable)")
    p.add_argument("--eval-data", default="builtin",
                   help="'builtin' (the package's data/eval, never used for calibration), a folder with metadata.jsonl "
                   "(+ text.jsonl) or a .jsonl of {image, text} / {text} lines (default: builtin)")
    p.add_argument("--onnx", default=None, metavar="DIR",
                   help="an `nvila-export onnx` folder: also compare its visual tokens with PyTorch's")
    add_output(p, help="report folder to create (default: ./nvila-report)", default="nvila-report")
    add_device(p)
    add_dtype(p, None, help="dtype for every model (default: bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--generations", type=int, default=3, help="prompts whose greedy outputs are shown (default: 3)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="length of those generations (default: 24)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed and memory measurements")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per model; medians are reported (default: 3)")
    p.add_argument("--decode-tokens", type=int, default=16, help="tokens decoded per timed run (default: 16)")
    p.add_argument("--html", action="store_true", help="also write a single self-contained report.html")
    p.add_argument("--cpu-activations", choices=["int8"], default=None,
                   help="also run each candidate with int8 activations in the CPU int4 kernels "
                   "(NVILA_QUANT_CPU_ACTIVATIONS=int8, AVX-512 VNNI) as an extra row: its KL and argmax agreement "
                   "against the reference next to the exact mode's (--device cpu)")
    add_benchmark_flags(p)
    add_overwrite(p, what="the output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nvila_quant.report.compare import CompareConfig, compare

    cfg = CompareConfig(
        eval_data=args.eval_data, device=args.device, dtype=args.dtype, n_generate=args.generations,
        max_new_tokens=args.max_new_tokens, speed=not args.no_speed, repeats=args.repeats,
        decode_tokens=args.decode_tokens, html=args.html, overwrite=args.overwrite,
        tasks=(args.tasks or "").split(",") if args.tasks else [], tasks_paths=args.tasks_path, limit=args.limit,
        cpu_activations=args.cpu_activations,
    )
    report = compare(args.reference, args.candidate, args.output, cfg, onnx_dir=args.onnx)
    for c in report["candidates"]:
        a = c["accuracy"]
        print(f"{c['name']}: mean KL {a['kl_mean']}, argmax agreement {a['top1_agreement']}, "
              f"size ratio {c['size_ratio']['total_mb']}")
    if report.get("benchmark"):
        print_deltas(report["benchmark"])
    print(f"report written to {args.output}/report.md")
    return 0
