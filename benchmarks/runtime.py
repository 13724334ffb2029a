"""Runtime speed on CPU: vision encode per image, prefill and decode tokens/s, fp32 vs bf16, same run.

    python benchmarks/runtime.py [--decode-tokens 32] [--repeats 3] [--skip-large]

Models: the tiny test model and a larger synthetic one whose linear layers dominate (LLM hidden 1536,
4 layers, intermediate 8960, as Qwen2.5-1.5B's widths). The baseline is fp32 in the same process; the
table shows bf16/fp32 ratios. Writes one result file per run, benchmarks/results/runtime/<time>-<machine>.json, with
every timed run (``runs``) next to the medians in each row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_results_arg, machine, table, write_result  # noqa: E402

from nvila_quant.model import NVILAQwen2  # noqa: E402
from nvila_quant.model.generation import timed_run  # noqa: E402
from nvila_quant.model.media import load_image  # noqa: E402
from nvila_quant.paths import builtin_calib_dir  # noqa: E402
from nvila_quant.testing.factory import TinySpec, make_tiny  # noqa: E402

SPECS = {
    "tiny": TinySpec(seed=0),
    "large-llm": TinySpec(seed=0, llm_hidden=1536, llm_intermediate=8960, llm_layers=4, llm_heads=12, llm_kv_heads=2),
}


def measure(path: Path, dtype: torch.dtype, decode_tokens: int, repeats: int) -> dict:
    model = NVILAQwen2.load_pretrained(path, torch_dtype=dtype, device="cpu")
    image = load_image(builtin_calib_dir() / "astronaut.jpg")
    input_ids, media, media_config = model.prompt_inputs([image, "Describe the image in detail."])
    timed_run(model, input_ids, media, media_config, max_new_tokens=2)  # warm-up
    runs = [timed_run(model, input_ids, media, media_config, max_new_tokens=decode_tokens) for _ in range(repeats)]
    return {**{k: statistics.median(r[k] for r in runs) for k in runs[0]}, "runs": runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per run (default: 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the median is kept")
    parser.add_argument("--skip-large", action="store_true", help="only the tiny model")
    add_results_arg(parser)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in SPECS.items():
            if args.skip_large and name != "tiny":
                continue
            path = make_tiny(Path(tmp) / name, spec)
            base = None
            for dtype in (torch.float32, torch.bfloat16):
                r = measure(path, dtype, args.decode_tokens, args.repeats)
                base = base or r
                rows.append({
                    "model": name, "dtype": str(dtype).removeprefix("torch."),
                    "vision_ms_per_image": r["vision_encode_ms"], "prefill_tokens": r["prefill_tokens"],
                    "prefill_tok_s": r["prefill_tokens_per_s"], "decode_tok_s": r["decode_tokens_per_s"],
                    "ttft_ms": r["ttft_ms"],
                    "decode_vs_fp32": r["decode_tokens_per_s"] / base["decode_tokens_per_s"],
                    "prefill_vs_fp32": r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"],
                    "runs": r["runs"],
                })
    cols = ["model", "dtype", "vision_ms_per_image", "prefill_tokens", "prefill_tok_s", "decode_tok_s", "ttft_ms",
            "prefill_vs_fp32", "decode_vs_fp32"]
    print(f"machine: {machine()['cpu']}, {torch.get_num_threads()} threads")
    print(table(rows, cols))
    path = write_result("runtime", {"decode_tokens": args.decode_tokens, "repeats": args.repeats, "rows": rows},
                        None, "cpu", args.results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
