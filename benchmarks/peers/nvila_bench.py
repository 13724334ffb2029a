"""Our runtime's side of ``benchmarks/cpu_peers.py`` (run by the project's venv, one process per step).

    python nvila_bench.py make-float --out DIR --spec JSON          the float synthetic NVILA (make_tiny)
    python nvila_bench.py quantize --src DIR --dst DIR [--head]     RTN 4-bit g128, AutoAWQ format (+ int4 lm_head)
    python nvila_bench.py bench --model DIR --prompts JSON --threads T --prefill 32,128,512 --decode-tokens 64
                                --out JSON
    python nvila_bench.py bench-image --model DIR --image PNG --threads T --decode-tokens 64 --out JSON

``bench`` loads the checkpoint with ``NVILAQwen2.load_pretrained`` (bf16 activations), as ``nvila-quant generate``
loads it, and times it with ``timed_run``, the function behind ``NVILAQwen2.benchmark`` and ``compare``: each
prefill length is one ``timed_run`` with no decode step (its ``prefill_ms``); decode is one ``timed_run`` of
``--decode-tokens`` + 1 new tokens after the decode prompt (the first comes from the prefill's logits, then
``--decode-tokens`` steps through the model's ``DecodeSession``, default decode mode). Warm-up first: every prefill
length once, and a 4-token decode. ``bench-image`` times an image prompt (the image and "Describe the image.") with
``measure_speed``, the function behind ``compare``'s speed table: vision encode, TTFT and decode of one timed run
after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def make_float(out: Path, spec: dict) -> None:
    import torch

    from nvila_quant.testing.factory import TinySpec, make_tiny

    # the models are built in bf16 (the stored dtype): an fp32 build of the 8B shape would need ~30 GB
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.no_grad():
            make_tiny(out, TinySpec(**spec))
    finally:
        torch.set_default_dtype(old)


def quantize(src: Path, dst: Path, head: bool) -> None:
    from nvila_quant.quant.rtn import write_rtn_checkpoint

    write_rtn_checkpoint(src, dst, "autoawq", bits=4, group_size=128, quantize_lm_head=head)


def bench(args: argparse.Namespace) -> dict:
    import torch

    from nvila_quant.model import NVILAQwen2
    from nvila_quant.model.generation import timed_run
    from nvila_quant.model.static_decode import decode_settings

    torch.set_num_threads(args.threads)
    prompts = json.loads(args.prompts.read_text())
    t = time.perf_counter()
    model = NVILAQwen2.load_pretrained(args.model, torch_dtype=torch.bfloat16, device="cpu")
    load_s = time.perf_counter() - t
    llm = model.get_llm()
    weight_bytes = sum(p.numel() * p.element_size() for p in [*llm.parameters(), *llm.buffers()])

    def ids(tokens: list[int]) -> torch.Tensor:
        return torch.tensor([tokens], dtype=torch.long)

    lengths = [s for s in args.prefill.split(",") if s]
    with torch.inference_mode():
        for n in lengths:  # warm-up
            timed_run(model, ids(prompts["prefill"][n]), None, None, max_new_tokens=1)
        timed_run(model, ids(prompts["decode"]), None, None, max_new_tokens=5)
        prefill = {n: timed_run(model, ids(prompts["prefill"][n]), None, None, max_new_tokens=1)["prefill_ms"] / 1e3
                   for n in lengths}
        decode = (timed_run(model, ids(prompts["decode"]), None, None, max_new_tokens=args.decode_tokens + 1)
                  if args.decode_tokens > 0 else None)
    static = getattr(model.decode_session, "static", None)
    step = ("dynamic" if static is None else
            ("cuda-graph" if getattr(static, "graph", None) is not None else "static")
            + ("+compiled" if getattr(static, "compiled", False) else ""))
    return {"load_s": load_s, "prefill_s": prefill, "decode": decode,
            "decode_tokens_per_s": decode["decode_tokens_per_s"] if decode else None,
            "decode_mode": decode_settings().mode, "decode_step": step, "llm_weight_bytes": weight_bytes,
            "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "torch": torch.__version__}


def bench_image(args: argparse.Namespace) -> dict:
    import torch

    from nvila_quant.model.static_decode import decode_settings
    from nvila_quant.report.speed import measure_speed

    torch.set_num_threads(args.threads)
    res = measure_speed(str(args.model), str(args.image), repeats=1, decode_tokens=args.decode_tokens + 1)
    return {**res, "decode_mode": decode_settings().mode, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-float", help="write the float synthetic checkpoint")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--spec", required=True, help="TinySpec fields as JSON")
    p = sub.add_parser("quantize", help="RTN 4-bit g128 AutoAWQ checkpoint of a float one")
    p.add_argument("--src", type=Path, required=True)
    p.add_argument("--dst", type=Path, required=True)
    p.add_argument("--head", action="store_true", help="quantize the lm_head too")
    p = sub.add_parser("bench", help="time prefill and decode")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--prompts", type=Path, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--prefill", default="")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("bench-image", help="time vision encode, TTFT and decode of an image prompt")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.cmd == "make-float":
        make_float(args.out, json.loads(args.spec))
    elif args.cmd == "quantize":
        quantize(args.src, args.dst, args.head)
    elif args.cmd == "bench-image":
        args.out.write_text(json.dumps(bench_image(args), indent=1))
    else:
        args.out.write_text(json.dumps(bench(args), indent=1))


if __name__ == "__main__":
    main()
