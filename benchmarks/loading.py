"""Loading a quantized NVILA on CPU: memory and time vs loading the float checkpoint, same run.

    python benchmarks/loading.py [--repeats 3] [--small] [--llm-hidden 3584 --llm-layers 4 ...]

The model is ``make_tiny`` with a 7B-wide LLM stack by default (Qwen2-7B's widths: hidden 3584, intermediate 18944,
28 heads / 4 KV heads; 4 layers instead of 28, so its int4 linears take ~466 MB), written in bf16 and RTN-quantized
with ``write_rtn_checkpoint`` (autoawq, 4-bit g128; LLM and projector). Both are built in a child process, then each
load runs in a fresh child process (quantized and float alternate, ``--repeats`` each) that measures:

- the interpreter's resident memory after ``import torch, nvila_quant.model`` (VmRSS);
- the peak resident memory while ``NVILAQwen2.load_pretrained(DIR, torch_dtype=bf16, device="cpu")`` runs (VmHWM,
  reset through /proc/self/clear_refs after the imports where the kernel allows it, else the process's peak);
- the resident memory after the load, and the load's wall seconds;
- the resident memory after a first forward of 32 tokens through the LLM, and its seconds: the float checkpoint's
  weights stay mapped from the file and are paged in only when used, so the load alone understates what a float
  model holds once it runs; after a forward both hold what they use.

The table gives medians; ratios are quantized / float (the baseline). The checkpoints' files were just written, so
they are in the page cache (a warm load). Writes one result file per run,
benchmarks/results/loading/<time>-<machine>[-small].json, with every child's measures (``runs``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_results_arg, table, write_result  # noqa: E402

from nvila_quant.testing import TinySpec  # noqa: E402

DEFAULT = dict(llm_hidden=3584, llm_intermediate=18944, llm_layers=4, llm_heads=28, llm_kv_heads=4)
SMALL = dict(llm_hidden=256, llm_intermediate=640, llm_layers=2, llm_heads=4, llm_kv_heads=2)  # smoke runs

# One load in a fresh interpreter; argv: checkpoint folder. Prints one JSON line.
CHILD = r"""
import json, sys, time
from pathlib import Path

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB -> MB
    return None

import torch, nvila_quant.model
from nvila_quant.model import NVILAQwen2

out = {"interpreter_rss_mb": status("VmRSS"), "interpreter_peak_rss_mb": status("VmHWM")}
try:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, so the next peak is the load's
    out["peak_reset"] = True
except OSError:
    out["peak_reset"] = False
t = time.perf_counter()
model = NVILAQwen2.load_pretrained(sys.argv[1], torch_dtype=torch.bfloat16, device="cpu")
out["load_s"] = time.perf_counter() - t
out["peak_rss_mb"] = status("VmHWM")
out["rss_after_load_mb"] = status("VmRSS")
out["rss_anon_after_load_mb"] = status("RssAnon")
out["rss_file_after_load_mb"] = status("RssFile")
out["peak_above_interpreter_mb"] = out["peak_rss_mb"] - out["interpreter_rss_mb"]
out["after_load_above_interpreter_mb"] = out["rss_after_load_mb"] - out["interpreter_rss_mb"]
ids = torch.arange(32)[None] % model.get_llm().config.vocab_size
t = time.perf_counter()
with torch.inference_mode():
    model.get_llm()(input_ids=ids)
out["first_forward_s"] = time.perf_counter() - t
out["rss_after_forward_mb"] = status("VmRSS")
out["after_forward_above_interpreter_mb"] = out["rss_after_forward_mb"] - out["interpreter_rss_mb"]
print(json.dumps(out))
"""

# Builds both checkpoints; argv: folder, spec JSON, format.
BUILD = r"""
import json, sys
from pathlib import Path
from nvila_quant.quant.rtn import write_rtn_checkpoint
from nvila_quant.testing import TinySpec, make_tiny

root, spec, fmt = Path(sys.argv[1]), TinySpec(**json.loads(sys.argv[2])), sys.argv[3]
src = make_tiny(root / "float", spec)
write_rtn_checkpoint(src, root / "int4", fmt, bits=4, group_size=128)
"""


def _python(code: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False, env=env)
    if res.returncode:
        raise RuntimeError(f"child process failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res.stdout


def checkpoint_sizes(folder: Path) -> dict[str, float]:
    """MB on disk of the whole folder and of llm/, and of the packed int4 weights (``*.qweight``) in it."""
    from safetensors import safe_open

    files = [f for f in folder.rglob("*") if f.is_file()]
    packed = 0
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as st:
                for key in st.keys():
                    if key.endswith(".qweight"):
                        t = st.get_slice(key)
                        shape, dtype = t.get_shape(), t.get_dtype()
                        n = 1
                        for d in shape:
                            n *= d
                        packed += n * {"I32": 4, "U8": 1, "I8": 1, "I16": 2}.get(dtype, 4)
    mb = 2**20
    return {"total_MB": sum(f.stat().st_size for f in files) / mb,
            "llm_MB": sum(f.stat().st_size for f in files if "llm" in f.relative_to(folder).parts[:1]) / mb,
            "int4_linear_MB": packed / mb}


def summarize(runs: list[dict]) -> dict:
    keys = ("interpreter_rss_mb", "peak_above_interpreter_mb", "after_load_above_interpreter_mb", "rss_after_load_mb",
            "load_s", "after_forward_above_interpreter_mb", "first_forward_s")
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="loads per checkpoint, each in its own process, "
                        "quantized and float alternating (default: 3; medians)")
    parser.add_argument("--small", action="store_true",
                        help="a small LLM (hidden 256, 2 layers) for a smoke run, instead of the 7B-wide stack")
    parser.add_argument("--llm-hidden", type=int, default=None,
                        help=f"LLM hidden size (default {DEFAULT['llm_hidden']})")
    parser.add_argument("--llm-intermediate", type=int, default=None,
                        help=f"LLM MLP width (default {DEFAULT['llm_intermediate']})")
    parser.add_argument("--llm-layers", type=int, default=None, help=f"LLM layers (default {DEFAULT['llm_layers']})")
    parser.add_argument("--llm-heads", type=int, default=None, help=f"attention heads (default {DEFAULT['llm_heads']})")
    parser.add_argument("--llm-kv-heads", type=int, default=None,
                        help=f"key/value heads (default {DEFAULT['llm_kv_heads']})")
    parser.add_argument("--format", default="autoawq", choices=["autoawq", "compressed-tensors", "tinychat"],
                        help="checkpoint format of the quantized model (default: autoawq)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to build the two checkpoints (default: a temporary folder, removed after)")
    add_results_arg(parser)
    args = parser.parse_args(argv)
    sizes = dict(SMALL if args.small else DEFAULT)
    sizes.update({k: v for k in DEFAULT if (v := getattr(args, k)) is not None})
    spec = TinySpec(seed=0, **sizes)
    with tempfile.TemporaryDirectory(prefix="nvq-loading-", dir=args.workdir) as tmp:
        root = Path(tmp)
        print(f"building the float and int4 checkpoints ({sizes})", flush=True)
        _python(BUILD, str(root), json.dumps(asdict(spec)), args.format)
        checkpoints = {"int4": root / "int4", "float": root / "float"}
        disk = {name: checkpoint_sizes(path) for name, path in checkpoints.items()}
        runs: dict[str, list[dict]] = {name: [] for name in checkpoints}
        for i in range(args.repeats):
            for name, path in checkpoints.items():
                runs[name].append(json.loads(_python(CHILD, str(path)).strip().splitlines()[-1]))
                r = runs[name][-1]
                print(f"  {i + 1}/{args.repeats} {name}: peak {r['peak_above_interpreter_mb']:.0f} MB above the "
                      f"interpreter's {r['interpreter_rss_mb']:.0f} MB, {r['load_s']:.2f} s", flush=True)
    rows = [{"model": name, "dtype": "bfloat16", "llm_MB_on_disk": disk[name]["llm_MB"],
             "int4_linear_MB": disk[name]["int4_linear_MB"], **summarize(runs[name])} for name in checkpoints]
    base = rows[1]
    ratios = {k: rows[0][k] / base[k] if base[k] else None
              for k in ("peak_above_interpreter_mb", "after_load_above_interpreter_mb", "load_s",
                        "after_forward_above_interpreter_mb")}
    rows[0].update({f"{k}_x_float": v for k, v in ratios.items()})
    print(table(rows, ["model", "llm_MB_on_disk", "int4_linear_MB", "interpreter_rss_mb", "peak_above_interpreter_mb",
                       "after_load_above_interpreter_mb", "after_forward_above_interpreter_mb", "load_s",
                       "first_forward_s", "after_forward_above_interpreter_mb_x_float", "load_s_x_float"]))
    label = f"{sizes['llm_hidden']}-wide {sizes['llm_layers']}-layer LLM"
    print(f"{label}: quantized / float resident after the first forward "
          f"{ratios['after_forward_above_interpreter_mb']:.2f}x, peak while loading "
          f"{ratios['peak_above_interpreter_mb']:.2f}x, load time {ratios['load_s']:.2f}x")
    payload = {"spec": sizes, "label": label, "format": args.format, "bits": 4, "group_size": 128,
               "dtype": "bfloat16", "repeats": args.repeats, "page_cache": "warm (checkpoints just written)",
               "checkpoints": disk, "rows": rows, "quantized_vs_float": ratios, "runs": runs}
    variant = "small" if args.small else None if sizes == DEFAULT else f"h{sizes['llm_hidden']}-l{sizes['llm_layers']}"
    path = write_result("loading", payload, variant, "cpu", args.results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
