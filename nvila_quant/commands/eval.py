"""``nvila-quant eval``: benchmark scores (MMMU, TextVQA, VQAv2, MME, ...) of checkpoints through lmms-eval."""

from __future__ import annotations

import argparse

from nvila_quant.commands.common import add_device, add_dtype, add_output, add_overwrite, add_quiet


def add_benchmark_flags(p: argparse.ArgumentParser, required: bool = False) -> None:
    """--tasks, --tasks-path and --limit (shared with ``compare``)."""
    p.add_argument("--tasks", required=required, metavar="T1,T2,...",
                   help="lmms-eval tasks or groups, comma-separated (mmmu_val, textvqa_val, vqav2_val, mme, ...; "
                   "the built-in offline set: nvq_mc,nvq_vqa,nvq_choice with --tasks-path builtin)"
                   + ("" if required else "; adds a benchmark section to the report"))
    p.add_argument("--tasks-path", action="append", default=[], metavar="DIR",
                   help="a folder of task files in lmms-eval's format (its --include_path), or 'builtin' for the "
                   "package's local tasks; repeatable. Offline, hub tasks fail at once: use local task folders")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate the first N documents of each task (default: all)")


def print_deltas(bench: dict) -> None:
    """One line per model and task, then the deltas to the reference."""
    for m in bench["models"]:
        for task, metrics in m["scores"].items():
            scores = ", ".join(f"{k} {v}" for k, v in metrics.items())
            print(f"{m['name']}: {task}: {scores}{' (cached)' if m['cached'] else ''}")
    for d in bench["deltas"]:
        ci = "" if d["ci_low"] is None else f" [{d['ci_low']}, {d['ci_high']}]"
        print(f"{d['candidate']} - {bench['models'][0]['name']}: {d['task']} {d['metric']} {d['delta']}{ci}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="benchmark scores of checkpoints through lmms-eval, side by side",
        description="Run lmms-eval tasks on each checkpoint in turn (float or quantized, either layout; batch 1, "
        "greedy) through the model adapter nvila_quant, in this process, and write one table: each task's score "
        "per model and each later model's delta to the first with a paired-bootstrap interval, plus the documents "
        "whose answers changed. Writes results.md, results.json and models/<name>/ (scores, per-document answers, "
        "the harness's log). A model already evaluated with the same cache key (checkpoint fingerprint, tasks, "
        "limit, settings) is not evaluated again: an interrupted run resumes from OUTPUT.work, and with "
        "--overwrite the models in OUTPUT are reused. Needs the eval extra (pip install 'nvila-quant[eval]').",
    )
    p.add_argument("--model", action="append", required=True, metavar="DIR",
                   help="an NVILA checkpoint (repeatable; the first is the reference of the deltas)")
    add_benchmark_flags(p, required=True)
    add_output(p, help="results folder to create (default: ./nvila-eval)", default="nvila-eval")
    add_device(p)
    add_dtype(p, None, help="dtype for every model (default: bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--onnx", default=None, metavar="DIR",
                   help="run the vision tower through onnxruntime from this `nvila-export onnx` folder (every model)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="answer length where a task sets none (default: 256)")
    p.add_argument("--ll-reduction", choices=("sum", "mean"), default="sum",
                   help="log-likelihood requests: the continuation's summed (lm-eval's quantity) or per-token mean "
                   "negative log-likelihood (default: sum)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples of the delta intervals; 0 uses the harness's standard errors "
                   "(default: 1000)")
    p.add_argument("--examples", type=int, default=10,
                   help="changed answers listed per candidate and task (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the harness and of the bootstrap (default: 0)")
    p.add_argument("--recompute", action="store_true", help="evaluate every model again, ignoring cached results")
    p.add_argument("--html", action="store_true", help="also write a self-contained results.html")
    add_quiet(p)
    add_overwrite(p, what="the output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nvila_quant.eval.runner import EvalConfig
    from nvila_quant.report.benchmark import evaluate

    cfg = EvalConfig(args.tasks, args.tasks_path, args.limit, device=args.device, dtype=args.dtype,
                     onnx_dir=args.onnx, max_new_tokens=args.max_new_tokens, ll_reduction=args.ll_reduction,
                     seed=args.seed, bootstrap=args.bootstrap, examples=args.examples, recompute=args.recompute,
                     quiet=args.quiet)
    report = evaluate(args.model, args.output, cfg, html=args.html, overwrite=args.overwrite)
    print_deltas(report)
    print(f"results written to {args.output}/results.md")
    return 0
