"""AWQ engine: time per block and in total, peak memory vs depth, and accuracy vs float for RTN vs AWQ.

    python benchmarks/awq.py [--n-samples 4] [--seqlen 1024] [--skip-large] [--depths 2 6]

Three parts, each with its baseline in the same run:
1. accuracy: RTN, AWQ (reference numerics) and AWQ with every option on (and, on the tiny model, each option
   alone), for the tiny outlier model and a
   larger synthetic one (LLM hidden 1536, intermediate 4096, 4 layers, 12 heads, 2 KV heads): next-token
   KL, top-1 agreement and perplexity vs the float model on the held-out conversations of the package's ``data/eval``;
2. time: wall seconds per LLM block and in total (from each run's quant_log.json);
3. memory: peak RSS of an AWQ run on the same synthetic model at two depths, each in its own process,
   next to the peak RSS of just loading that float model (what a whole-model pipeline starts from).
Writes one result file per run, benchmarks/results/awq/<time>-<machine>[-<parts>].json, with each run's
quant_log.json (``quant_log``: per-block times and losses) and each memory run's per-block times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_results_arg, table, write_result  # noqa: E402

from nvila_quant.calibration import build_samples, embed_samples, load_records  # noqa: E402
from nvila_quant.machine import peak_rss_mb  # noqa: E402
from nvila_quant.model import NVILAQwen2  # noqa: E402
from nvila_quant.paths import builtin_eval_dir  # noqa: E402
from nvila_quant.quant.config import AWQConfig  # noqa: E402
from nvila_quant.quant.evaluate import llm_logits, load_dequantized, next_token_metrics  # noqa: E402
from nvila_quant.quant.runner import quantize  # noqa: E402
from nvila_quant.testing.factory import TinySpec, make_tiny  # noqa: E402

LARGE = dict(llm_hidden=1536, llm_intermediate=4096, llm_heads=12, llm_kv_heads=2)
SPECS = {"tiny": TinySpec(seed=0), "large": TinySpec(seed=0, llm_layers=4, **LARGE)}
OPTIONS = dict(duo_scaling=True, grid_include_one=True, gqa_vo=True, quant_input=True)


def child(args: argparse.Namespace) -> None:
    """One measured job in a fresh process; prints a JSON line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    if args.child == "load":
        NVILAQwen2.load_pretrained(args.model, torch_dtype=torch.float32, device="cpu")
        out = {}
    else:
        cfg = AWQConfig(n_samples=args.n_samples, seqlen=args.seqlen, text_ratio=0.25)
        log = quantize(args.model, cfg, "builtin", args.output, progress=False).log
        out = {"blocks_s": [b["time_s"]["total"] for b in log["blocks"]],
               "blocks_time_s": [b["time_s"] for b in log["blocks"]], "timings": log["timings"]}
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "wall_s": time.perf_counter() - t0, **out}))


def _run_child(kind: str, model: Path, output: Path | None, n_samples: int, seqlen: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--model", str(model), "--n-samples", str(n_samples),
           "--seqlen", str(seqlen)] + (["--output", str(output)] if output else [])
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def accuracy(name: str, path: Path, tmp: Path, n_samples: int, seqlen: int, ablation: bool = False) -> list[dict]:
    ref = NVILAQwen2.load_pretrained(path, torch_dtype=torch.float32, device="cpu")
    evalset = embed_samples(ref, build_samples(load_records(builtin_eval_dir()), 8, 0.5, seed=0), seqlen=4096,
                            capture_projector=False, progress=False)
    ref_logits = llm_logits(ref, evalset)
    del ref
    rows = []
    runs = {
        "rtn": (AWQConfig(method="rtn"), None),
        "awq": (AWQConfig(n_samples=n_samples, seqlen=seqlen), "builtin"),
        "awq+options": (AWQConfig(n_samples=n_samples, seqlen=seqlen, **OPTIONS), "builtin"),
    }
    if ablation:  # each option alone
        for opt in OPTIONS:
            runs[f"awq+{opt}"] = (AWQConfig(n_samples=n_samples, seqlen=seqlen, **{opt: True}), "builtin")
    for method, (cfg, calib) in runs.items():
        out = tmp / f"{name}-{method}"
        t0 = time.perf_counter()
        log = quantize(path, cfg, calib, out, progress=False).log
        wall = time.perf_counter() - t0
        model = load_dequantized(out, torch.float32, "cpu")
        m = next_token_metrics(ref_logits, llm_logits(model, evalset), evalset)
        blocks = [b["time_s"]["total"] for b in log.get("blocks", [])]
        awq_blocks = [b for b in log.get("blocks", []) if "mse_awq" in b]
        rows.append({
            "model": name, "method": method, "total_s": wall,
            "s_per_block": statistics.mean(blocks) if blocks else None,
            "kl": m["kl"], "top1": m["top1"], "ppl": m["ppl"], "ppl_float": m["ppl_ref"], "eval_tokens": m["tokens"],
            "block_mse_rtn": statistics.mean(b["mse_rtn"] for b in awq_blocks) if awq_blocks else None,
            "block_mse_awq": statistics.mean(b["mse_awq"] for b in awq_blocks) if awq_blocks else None,
            "blocks_s": blocks, "timings": log["timings"], "quant_log": log,
        })
        print(f"  {name} {method}: {wall:.1f} s, KL {m['kl']:.4f}, top-1 {m['top1']:.3f}", flush=True)
    return rows


def memory(tmp: Path, depths: list[int], n_samples: int, seqlen: int) -> list[dict]:
    rows = []
    for depth in depths:
        path = make_tiny(tmp / f"depth{depth}", TinySpec(seed=0, llm_layers=depth, **LARGE))
        load = _run_child("load", path, None, n_samples, seqlen)
        run = _run_child("awq", path, tmp / f"depth{depth}-awq", n_samples, seqlen)
        rows.append({"layers": depth, "awq_peak_rss_mb": run["peak_rss_mb"],
                     "float_load_peak_rss_mb": load["peak_rss_mb"],
                     "awq_wall_s": run["wall_s"], "s_per_block": statistics.mean(run["blocks_s"]),
                     "float_load_wall_s": load["wall_s"], "awq_blocks_s": run["blocks_s"],
                     "awq_blocks_time_s": run["blocks_time_s"], "awq_timings": run["timings"]})
        print(f"  depth {depth}: AWQ peak RSS {run['peak_rss_mb']:.0f} MB "
              f"(float load alone {load['peak_rss_mb']:.0f} MB)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-samples", type=int, default=4, help="calibration conversations (default: 4)")
    parser.add_argument("--seqlen", type=int, default=1024, help="tokens per conversation (default: 1024)")
    parser.add_argument("--depths", type=int, nargs=2, default=[2, 6], help="LLM depths of the memory runs")
    parser.add_argument("--memory-samples", type=int, default=2, help="calibration conversations of the memory runs")
    parser.add_argument("--skip-large", action="store_true", help="accuracy on the tiny model only; no memory runs")
    parser.add_argument("--parts", nargs="+", choices=["accuracy", "memory"], default=["accuracy", "memory"],
                        help="which parts to run (default: both)")
    parser.add_argument("--child", choices=["load", "awq"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    add_results_arg(parser)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    acc, mem = [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name, spec in SPECS.items():
            if args.skip_large and name != "tiny" or "accuracy" not in args.parts:
                continue
            print(f"accuracy and time: {name}", flush=True)
            acc += accuracy(name, make_tiny(tmp / name, spec), tmp, args.n_samples, args.seqlen,
                            ablation=name == "tiny")
        if not args.skip_large and "memory" in args.parts:
            print("memory vs depth (large widths)", flush=True)
            mem = memory(tmp, args.depths, args.memory_samples, 512)
    print()
    if acc:
        print(table(acc, ["model", "method", "total_s", "s_per_block", "kl", "top1", "ppl", "ppl_float",
                          "block_mse_rtn", "block_mse_awq"]))
    if mem:
        print()
        print(table(mem, ["layers", "awq_peak_rss_mb", "float_load_peak_rss_mb", "awq_wall_s", "s_per_block"]))
    settings = {
        "n_samples": args.n_samples, "seqlen": args.seqlen, "eval": "data/eval, 4 image + 4 text conversations",
        "options": OPTIONS, "memory_runs": {"depths": args.depths, "n_samples": args.memory_samples, "seqlen": 512},
        "load_average_at_end": os.getloadavg(),  # other processes on the machine inflate wall times
        "specs": {name: {k: v for k, v in asdict(spec).items() if k.startswith("llm_")}
                  for name, spec in SPECS.items()},
        "memory_spec": {"llm_layers": args.depths, **LARGE}, "w_bit": 4, "group_size": 128,
    }
    variant = None if set(args.parts) == {"accuracy", "memory"} else "-".join(args.parts)
    path = write_result("awq", {"settings": settings, "accuracy": acc, "memory": mem}, variant, "cpu", args.results)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
