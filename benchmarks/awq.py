"""AWQ engine: time and accuracy against llm-compressor's AWQ, time per block, peak memory vs depth, and accuracy vs
float for RTN vs AWQ.

    python benchmarks/awq.py [--parts peers accuracy memory] [--n-samples 4] [--seqlen 1024] [--skip-large]

Parts, each with its baselines in the same run:
1. peers (``make bench-awq-peers``): on a synthetic NVILA with a 1536-wide, 8960-intermediate, 4-layer LLM (12 / 2
   heads, planted outlier channels) and 64 x 128 calibration tokens of text (``--peer-samples``, ``--peer-seqlen``):
   ``nvila-quant``'s AWQ with the default (fast) and the reference numerics, and llm-compressor's AWQ
   (``benchmarks/peers/llmcompressor_awq.py`` in a venv of its own under ``--workdir``: W4A16_ASYM, group 128,
   duo scaling, on the same token ids), each in its own process, in turn; wall time of the quantization (ours:
   ``quantize`` from the float folder to the written checkpoint; llm-compressor: ``oneshot``, and its load and
   save) and next-token KL / top-1 / perplexity against the float model on held-out text (a seed the calibration
   never saw), llm-compressor's checkpoint read by our compressed-tensors loader. Printed as ratios to
   llm-compressor; the goal of issue 21: default time <= 0.5x at KL <= 0.7x. The search's time per block and per
   group type comes from each of our runs' quant_log.json;
2. accuracy: RTN, AWQ (reference numerics), the reference with every option on (and, on the tiny model, each
   option alone) and the default (fast) numerics, for the tiny outlier model and a
   larger synthetic one (LLM hidden 1536, intermediate 4096, 4 layers, 12 heads, 2 KV heads): next-token
   KL, top-1 agreement and perplexity vs the float model on the held-out conversations of the package's ``data/eval``;
   time: wall seconds per LLM block and in total (from each run's quant_log.json);
3. memory: peak RSS of a default AWQ run on the same synthetic model at two depths, each in its own process,
   next to the peak RSS of just loading that float model (what a whole-model pipeline starts from).
Writes one result file per run, benchmarks/results/awq/<time>-<machine>[-<parts>].json, with each run's
quant_log.json (``quant_log``: per-block times and losses) and each memory run's per-block times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_results_arg, table, write_result  # noqa: E402

from nvila_quant.calibration import build_samples, embed_samples, load_records  # noqa: E402
from nvila_quant.machine import peak_rss_mb  # noqa: E402
from nvila_quant.model import NVILAQwen2  # noqa: E402
from nvila_quant.paths import builtin_eval_dir  # noqa: E402
from nvila_quant.quant.config import AWQConfig  # noqa: E402
from nvila_quant.quant.evaluate import llm_logits, load_dequantized, next_token_metrics  # noqa: E402
from nvila_quant.quant.runner import quantize  # noqa: E402
from nvila_quant.testing.factory import TinySpec, make_tiny, synthetic_corpus  # noqa: E402

LARGE = dict(llm_hidden=1536, llm_intermediate=4096, llm_heads=12, llm_kv_heads=2)
SPECS = {"tiny": TinySpec(seed=0), "large": TinySpec(seed=0, llm_layers=4, **LARGE)}
OPTIONS = dict(duo_scaling=True, grid_include_one=True, gqa_vo=True, quant_input=True)
HERE = Path(__file__).resolve().parent
PEER_SPEC = TinySpec(seed=0, llm_layers=4, llm_hidden=1536, llm_intermediate=8960, llm_heads=12, llm_kv_heads=2)
LLMCOMPRESSOR = "0.14.0.1"
GOALS = {"time": 0.5, "kl": 0.7}  # ours (default numerics) / llm-compressor (issue 21)


def child(args: argparse.Namespace) -> None:
    """One measured job in a fresh process; prints a JSON line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.child == "load":
        NVILAQwen2.load_pretrained(args.model, torch_dtype=torch.float32, device="cpu")
        out = {}
    else:
        cfg = AWQConfig(numerics=args.numerics, n_samples=args.n_samples, seqlen=args.seqlen,
                        text_ratio=args.text_ratio, targets=args.targets)
        log = quantize(args.model, cfg, args.calib, args.output, progress=False).log
        out = {"blocks_s": [b["time_s"]["total"] for b in log["blocks"]],
               "blocks_time_s": [b["time_s"] for b in log["blocks"]], "timings": log["timings"],
               "group_search_s": _group_times(log), "compute_dtype": log["compute_dtype"],
               "settings": log["settings"]}
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "wall_s": time.perf_counter() - t0, **out}))


def _group_times(log: dict) -> dict[str, float]:
    """Scale-search seconds per group type, summed over the blocks (quant_log.json)."""
    out: dict[str, float] = {}
    for block in log.get("blocks", []):
        for g in block.get("groups", []):
            out[g["name"]] = out.get(g["name"], 0.0) + g["time_s"]
    return out


def _text_records(path: Path, n: int, seed: int, sentences: int = 12) -> Path:
    """n {"text"} lines of the synthetic corpus, ``sentences`` sentences each (well over 128 tokens)."""
    corpus = synthetic_corpus(n * sentences, seed=seed)
    path.write_text("".join(json.dumps({"text": " ".join(corpus[i * sentences:(i + 1) * sentences])}) + "\n"
                            for i in range(n)))
    return path


def _kl_row(name: str, folder: Path, ref_logits: list, evalset) -> dict:
    model = load_dequantized(folder, torch.float32, "cpu")
    m = next_token_metrics(ref_logits, llm_logits(model, evalset), evalset)
    return {"kl": m["kl"], "top1": m["top1"], "ppl": m["ppl"], "ppl_float": m["ppl_ref"], "eval_tokens": m["tokens"]}


def vs_llmcompressor(tmp: Path, workdir: Path, n_samples: int, seqlen: int, threads: int,
                     spec: TinySpec = PEER_SPEC) -> dict:
    """Part 1: ours (fast, reference) and llm-compressor's AWQ on the same model, calibration ids and machine."""
    from cpu_peers import make_venv, pip_versions

    py = make_venv(workdir / "llmc", [[f"llmcompressor=={LLMCOMPRESSOR}", "transformers>=5.17,<5.25"]],
                   workdir / "logs", "llm-compressor")
    path = make_tiny(tmp / "peer", spec)
    calib = _text_records(tmp / "calib.jsonl", n_samples, seed=1)
    held_out = _text_records(tmp / "held_out.jsonl", 16, seed=2, sentences=6)
    ref = NVILAQwen2.load_pretrained(path, torch_dtype=torch.float32, device="cpu")
    # the token ids our pipeline calibrates on (text samples: the chat template, truncated to seqlen)
    cal = embed_samples(ref, build_samples(load_records(calib), n_samples, 1.0, seed=42), seqlen=seqlen,
                        capture_projector=False, progress=False)
    ids = tmp / "calib_ids.json"
    ids.write_text(json.dumps([s.input_ids.tolist() for s in cal.samples]))
    evalset = embed_samples(ref, build_samples(load_records(held_out), 16, 1.0, seed=0), seqlen=256,
                            capture_projector=False, progress=False)
    ref_logits = llm_logits(ref, evalset)
    del ref, cal
    rows = []
    for numerics in ("fast", "reference"):
        print(f"  nvila-quant awq --numerics {numerics}", flush=True)
        out = tmp / f"ours-{numerics}"
        run = _run_child("awq", path, out, n_samples, seqlen, numerics, str(calib), 1.0, "llm", threads)
        rows.append({"tool": f"nvila-quant ({numerics})", "quantize_s": run["wall_s"],
                     "peak_rss_mb": run["peak_rss_mb"], **_kl_row(numerics, out, ref_logits, evalset),
                     "compute_dtype": run["compute_dtype"], "group_search_s": run["group_search_s"],
                     "blocks_time_s": run["blocks_time_s"], "settings": run["settings"]})
        print(f"    {run['wall_s']:.0f} s, KL {rows[-1]['kl']:.4f}", flush=True)
    print("  llm-compressor AWQ (oneshot)", flush=True)
    llmc_out, result = tmp / "llmc-llm", tmp / "llmc.json"
    eval_ids, eval_logits = tmp / "eval_ids.json", tmp / "llmc_eval_logits.safetensors"
    eval_ids.write_text(json.dumps([s.input_ids.tolist() for s in evalset.samples]))
    cmd = [str(py), str(HERE / "peers" / "llmcompressor_awq.py"), "--llm", str(path / "llm"), "--calib", str(ids),
           "--output", str(llmc_out), "--threads", str(threads), "--result", str(result), "--eval", str(eval_ids),
           "--eval-logits", str(eval_logits)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"llm-compressor failed:\n{proc.stderr[-3000:]}")
    llmc = json.loads(result.read_text())
    # an NVILA folder around its llm/: our loader reads its compressed-tensors checkpoint like any third party's
    folder = tmp / "llmc-nvila"
    shutil.copytree(path, folder, ignore=shutil.ignore_patterns("llm"))
    shutil.copytree(llmc_out, folder / "llm")
    for f in (path / "llm").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens", "chat_template",
                              "generation_config")) and not (folder / "llm" / f.name).exists():
            shutil.copy(f, folder / "llm" / f.name)
    ours_reading = llm_logits(load_dequantized(folder, torch.float32, "cpu"), evalset)
    theirs = load_file(str(eval_logits))
    # the runtime grows the vocabulary by its media tokens: compare the checkpoint's own rows
    reader_diff = max(float((a[:, :theirs[str(i)].shape[1]] - theirs[str(i)]).abs().max())
                      for i, a in enumerate(ours_reading))
    rows.append({"tool": f"llm-compressor {llmc['versions']['llmcompressor']}", "quantize_s": llmc["oneshot_s"],
                 "process_s": wall, "load_s": llmc["load_s"], "save_s": llmc["save_s"],
                 **_kl_row("llm-compressor", folder, ref_logits, evalset), "compute_dtype": llmc["dtype"],
                 "reader_max_abs_logit_diff": reader_diff, "versions": llmc["versions"], "recipe": llmc["recipe"]})
    print(f"    our reader of its checkpoint vs transformers + compressed-tensors: max |logit diff| {reader_diff:.2e}",
          flush=True)
    print(f"    {llmc['oneshot_s']:.0f} s, KL {rows[-1]['kl']:.4f}", flush=True)
    base = rows[-1]
    for r in rows:
        r["time_vs_llmcompressor"] = r["quantize_s"] / base["quantize_s"]
        r["kl_vs_llmcompressor"] = r["kl"] / base["kl"]
    fast = rows[0]
    return {"spec": {k: v for k, v in asdict(spec).items() if k.startswith("llm_")}, "n_samples": n_samples,
            "seqlen": seqlen, "calibration_tokens": sum(len(x) for x in json.loads(ids.read_text())),
            "eval": "16 held-out synthetic texts (corpus seed 2), 256 tokens each", "threads": threads,
            "rows": rows, "goals": GOALS,
            "llmcompressor_venv": pip_versions(py, ("torch", "transformers", "llmcompressor", "compressed-tensors",
                                                    "datasets")),
            "met": {"time": fast["time_vs_llmcompressor"] <= GOALS["time"],
                    "kl": fast["kl_vs_llmcompressor"] <= GOALS["kl"]}}


def _run_child(kind: str, model: Path, output: Path | None, n_samples: int, seqlen: int, numerics: str = "fast",
               calib: str = "builtin", text_ratio: float = 0.25, targets: str = "llm,projector",
               threads: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--model", str(model), "--n-samples", str(n_samples),
           "--seqlen", str(seqlen), "--numerics", numerics, "--calib", calib, "--text-ratio", str(text_ratio),
           "--targets", targets, "--threads", str(threads)] + (["--output", str(output)] if output else [])
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
        "awq": (AWQConfig(numerics="reference", n_samples=n_samples, seqlen=seqlen), "builtin"),
        "awq+options": (AWQConfig(numerics="reference", n_samples=n_samples, seqlen=seqlen, **OPTIONS), "builtin"),
        "awq fast": (AWQConfig(n_samples=n_samples, seqlen=seqlen), "builtin"),
    }
    if ablation:  # each option alone
        for opt in OPTIONS:
            runs[f"awq+{opt}"] = (AWQConfig(numerics="reference", n_samples=n_samples, seqlen=seqlen, **{opt: True}),
                                  "builtin")
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
    parser.add_argument("--parts", nargs="+", choices=["peers", "accuracy", "memory"],
                        default=["peers", "accuracy", "memory"], help="which parts to run (default: all three)")
    parser.add_argument("--peer-samples", type=int, default=64,
                        help="calibration samples of the llm-compressor comparison (default: 64)")
    parser.add_argument("--peer-seqlen", type=int, default=128,
                        help="tokens per calibration sample of the llm-compressor comparison (default: 128)")
    parser.add_argument("--peer-smoke", action="store_true",
                        help="self-check of the peers part: the tiny test model, 4 x 64 calibration tokens (a minute "
                             "once llm-compressor's venv exists)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads of every quantization process (0 = torch's default); default 2")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "nvila-quant" / "awq_peers",
                        help="where llm-compressor's venv lives (created on first use, reused after); default "
                             "~/.cache/nvila-quant/awq_peers")
    parser.add_argument("--child", choices=["load", "awq"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--numerics", default="fast", help=argparse.SUPPRESS)
    parser.add_argument("--calib", default="builtin", help=argparse.SUPPRESS)
    parser.add_argument("--text-ratio", type=float, default=0.25, help=argparse.SUPPRESS)
    parser.add_argument("--targets", default="llm,projector", help=argparse.SUPPRESS)
    add_results_arg(parser)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    acc, mem, peers = [], [], None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if "peers" in args.parts:
            print("vs llm-compressor", flush=True)
            peers = (vs_llmcompressor(tmp, args.workdir.expanduser(), 4, 64, args.threads, TinySpec(seed=0))
                     if args.peer_smoke else
                     vs_llmcompressor(tmp, args.workdir.expanduser(), args.peer_samples, args.peer_seqlen,
                                      args.threads))
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
    if peers:
        print(table(peers["rows"], ["tool", "quantize_s", "time_vs_llmcompressor", "kl", "kl_vs_llmcompressor", "top1",
                                    "ppl", "ppl_float", "compute_dtype"]))
        print(f"goal (default numerics / llm-compressor): time <= {GOALS['time']}x "
              f"({'met' if peers['met']['time'] else 'NOT met'}), KL <= {GOALS['kl']}x "
              f"({'met' if peers['met']['kl'] else 'NOT met'})\n")
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
    variant = None if set(args.parts) == {"peers", "accuracy", "memory"} else "-".join(args.parts)
    if args.peer_smoke:
        variant = f"{variant or 'all'}-smoke"
    path = write_result("awq", {"settings": settings, "peers": peers, "accuracy": acc, "memory": mem}, variant, "cpu",
                        args.results)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
