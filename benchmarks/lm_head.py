"""The int4 lm_head (``--quantize-lm-head``): bytes of llm/ on disk and decode speed, against the same int4 model with
a float head, in the same run.

    python benchmarks/lm_head.py [--decode-tokens 32] [--repeats 3] [--spec cpu|7b-head|tiny] [--format autoawq]

The model is ``make_tiny`` with a real-sized vocabulary (151936 stored rows, Qwen2's) in front of a few wide decoder
layers, so the head is a large share of each decode step's weight reads (``cpu``: hidden 2048, 4 layers: the head is
311M of 491M linear weights; NVILA-8B's is 545M of 7.1B). It is RTN-quantized twice (4-bit g128, LLM and projector),
without and with the head, and the float checkpoint (bf16, fp32) and both quantized ones (bf16 and fp32 activations;
fp16 on a GPU) are timed with ``NVILAQwen2.benchmark`` on a text prompt, interleaved. Ratios: ``x_vs_int4`` is
against the int4 model with the float head at the same activation dtype, ``x_vs_bf16`` / ``x_vs_fp16`` against the
float model. Writes benchmarks/results/lm_head/<time>-<machine>[-<T>thread].json.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_results_arg, interleaved_runs, llm_bytes, table, write_result  # noqa: E402

from nvila_quant.model import NVILAQwen2  # noqa: E402
from nvila_quant.model.quantized import quantized_modules  # noqa: E402
from nvila_quant.quant.rtn import write_rtn_checkpoint  # noqa: E402
from nvila_quant.testing.factory import TinySpec, make_tiny  # noqa: E402

VOCAB = 151936  # Qwen2's stored vocabulary (NVILA-8B: 151648 stored; its int4 head is padded to 151680)
SPECS = {
    "tiny": TinySpec(seed=0, llm_vocab=VOCAB),  # the tests' layers: smoke runs only
    "cpu": TinySpec(seed=0, llm_hidden=2048, llm_intermediate=5632, llm_layers=4, llm_heads=16, llm_kv_heads=4,
                    llm_vocab=VOCAB),
    "7b-head": TinySpec(seed=0, llm_hidden=3584, llm_intermediate=18944, llm_layers=2, llm_heads=28, llm_kv_heads=4,
                        llm_vocab=VOCAB),
}
PROMPT = ["Write a long story about a cat who travels to the moon and back, with many details."]


def _disk_bytes(folder: Path) -> int:
    """Bytes of the safetensors shards in ``folder`` (headers included: what a download or a load reads)."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run(spec_name: str, fmt: str, decode_tokens: int, repeats: int, workdir: Path) -> dict:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    spec = SPECS[spec_name]
    src = make_tiny(workdir / "float", spec)
    int4 = write_rtn_checkpoint(src, workdir / "int4", fmt, bits=4, group_size=128, device=device)
    int4_head = write_rtn_checkpoint(src, workdir / "int4-head", fmt, bits=4, group_size=128, device=device,
                                     quantize_lm_head=True)
    disk = {"float": _disk_bytes(src / "llm"), "int4": _disk_bytes(int4 / "llm"),
            "int4+head": _disk_bytes(int4_head / "llm")}
    half = torch.float16 if cuda else torch.bfloat16
    variants = {  # name -> (folder, activation dtype, head)
        "int4": (int4, half, "float"),
        "int4+head": (int4_head, half, "int4"),
        "fp16" if cuda else "bf16": (src, half, "float"),
    }
    if not cuda:
        variants.update({"int4 fp32-act": (int4, torch.float32, "float"),
                         "int4+head fp32-act": (int4_head, torch.float32, "int4"),
                         "fp32": (src, torch.float32, "float")})
    models = {name: NVILAQwen2.load_pretrained(folder, torch_dtype=dtype, device=device)
              for name, (folder, dtype, _) in variants.items()}
    runs = interleaved_runs(models, PROMPT, decode_tokens, repeats)
    rows = []
    for name, model in models.items():
        folder, dtype, head = variants[name]
        rows.append({"model": name, "activations": str(dtype).removeprefix("torch."), "head": head,
                     "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs[name]),
                     "prefill_ms": statistics.median(r["prefill_ms"] for r in runs[name]),
                     "llm_disk_MB": _disk_bytes(folder / "llm") / 2**20,
                     "llm_weight_MB": llm_bytes(model) / 2**20,
                     "quantized_linears": len(quantized_modules(model))})
    tps = {r["model"]: r["decode_tokens_per_s"] for r in rows}
    base = "fp16" if cuda else "bf16"
    for r in rows:
        same_act = "int4" if r["activations"] != "float32" else "int4 fp32-act"
        r["x_vs_int4"] = r["decode_tokens_per_s"] / tps[same_act]
        r[f"x_vs_{base}"] = r["decode_tokens_per_s"] / tps[base]
        r["disk_x_vs_int4"] = r["llm_disk_MB"] * 2**20 / disk["int4"]
    del models
    gc.collect()
    sizes = {k: v for k, v in asdict(spec).items() if k.startswith("llm_")}
    return {"spec": spec_name, "spec_sizes": sizes, "vocab": VOCAB, "format": fmt, "device": device,
            "decode_tokens": decode_tokens, "repeats": repeats, "llm_disk_bytes": disk,
            "disk_int4_head_vs_int4": disk["int4+head"] / disk["int4"], "rows": rows, "runs": runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens generated per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model (interleaved; medians)")
    parser.add_argument("--spec", choices=sorted(SPECS), default=None,
                        help="synthetic model (default: cpu on CPU, 7b-head on a GPU; tiny: the tests' layers with a "
                        "152k vocabulary, for smoke runs)")
    parser.add_argument("--format", default="autoawq", choices=["autoawq", "compressed-tensors", "tinychat"],
                        help="checkpoint format of the quantized models")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's choice)")
    add_results_arg(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = args.spec or ("7b-head" if torch.cuda.is_available() else "cpu")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="nvq-lm-head-") as tmp, torch.inference_mode():
        result = run(spec, args.format, args.decode_tokens, args.repeats, Path(tmp))
    base = "fp16" if torch.cuda.is_available() else "bf16"
    print(table(result["rows"], ["model", "activations", "head", "decode_tokens_per_s", "prefill_ms", "llm_disk_MB",
                                 "disk_x_vs_int4", "llm_weight_MB", "x_vs_int4", f"x_vs_{base}"]))
    print(f"llm/ on disk: int4 head {result['disk_int4_head_vs_int4']:.3f}x the int4 model with a float head")
    result["load_average_start"] = load
    result["threads"] = torch.get_num_threads()
    result["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    variant = f"{args.threads}thread" if args.threads else None
    path = write_result("lm_head", result, variant, "cuda" if torch.cuda.is_available() else "cpu", args.results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
