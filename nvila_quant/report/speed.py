"""Speed and memory of one checkpoint, measured in a fresh process so peaks are per model.

    python -m nvila_quant.report.speed --model DIR --image PATH --output speed.json [--device ...]

Runs ``repeats`` timed runs after one warm-up: vision encode ms per image, time to first token and decode
tokens/s (medians), and the process's peak memory (RSS; on CUDA also the peak allocated device memory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from nvila_quant.machine import peak_rss_mb
from nvila_quant.model import Image, NVILAQwen2
from nvila_quant.model.generation import timed_run

__all__ = ["measure_in_subprocess", "measure_speed"]


def measure_speed(
    model_dir: str,
    image: str,
    device: str = "cpu",
    dtype: str | None = None,
    repeats: int = 3,
    decode_tokens: int = 16,
    load_kwargs: dict | None = None,
) -> dict:
    t0 = time.perf_counter()
    model = NVILAQwen2.load_pretrained(model_dir, torch_dtype=dtype, device=device, **(load_kwargs or {}))
    load_s = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    input_ids, media, media_config = model.prompt_inputs([Image(image), "Describe the image."])
    timed_run(model, input_ids, media, media_config, max_new_tokens=2)  # warm-up, excluded
    runs = [timed_run(model, input_ids, media, media_config, max_new_tokens=decode_tokens) for _ in range(repeats)]
    result = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    result["load_s"] = load_s
    result["peak_rss_mb"] = peak_rss_mb()
    result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    result["repeats"] = repeats
    result["image_tiles"] = len(media["image"])
    result["dtype"] = str(model.dtype).removeprefix("torch.")
    result["torch_threads"] = torch.get_num_threads()
    return result


def measure_in_subprocess(model_dir: str, image: str, output: Path, **kwargs) -> dict:
    """Run :func:`measure_speed` in a child Python process and read its JSON (``env``: extra environment variables
    of the child, e.g. a kernel setting)."""
    cmd = [sys.executable, "-m", "nvila_quant.report.speed", "--model", str(model_dir), "--image", str(image),
           "--output", str(output), "--device", kwargs.get("device", "cpu"),
           "--repeats", str(kwargs.get("repeats", 3)), "--decode-tokens", str(kwargs.get("decode_tokens", 16))]
    if kwargs.get("dtype"):
        cmd += ["--dtype", kwargs["dtype"]]
    if kwargs.get("load_kwargs"):
        cmd += ["--load-kwargs", json.dumps(kwargs["load_kwargs"])]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(kwargs.get("env") or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"speed measurement of {model_dir} failed:\n{proc.stderr[-3000:]}")
    return json.loads(output.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--image", required=True, help="image used for the timed prompt")
    p.add_argument("--output", required=True, help="JSON file to write")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: the checkpoint's)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; medians are reported")
    p.add_argument("--decode-tokens", type=int, default=16, help="tokens decoded per timed run")
    p.add_argument("--load-kwargs", default=None, help="JSON of extra load_pretrained keyword arguments")
    args = p.parse_args(argv)
    result = measure_speed(
        args.model, args.image, args.device, args.dtype, args.repeats, args.decode_tokens,
        json.loads(args.load_kwargs) if args.load_kwargs else None,
    )
    Path(args.output).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
