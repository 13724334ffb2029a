"""Peer-side timing of an ONNX Runtime GenAI model (run by the ORT-GenAI venv's python, not the project's).

    python ort_genai_bench.py --model DIR --prompts prompts.json --threads 2 --decode-tokens 64 --out result.json

One process, one model: a warm-up prefill at each length and a short warm-up decode, then each prefill length timed
(``Generator.append_tokens`` of the prompt's ids: the forward pass over the prompt, logits of its last position),
then ``--decode-tokens`` greedy decode steps after the decode prompt: after ``append_tokens`` (untimed, as the other
runtimes' prefill) one ``generate_next_token`` samples the first token from the prefill's logits (untimed), then each
timed ``generate_next_token`` runs the model on the previous token and picks the next one (a forward + argmax, as
a decode step of the other runtimes). ``min_length`` = ``max_length`` so a random model's end-of-sequence token never
stops the run. Thread count: the decoder's session options (``intra_op_num_threads``) through ``og.Config.overlay``.
Writes JSON: prefill seconds per length, decode seconds per step, versions, what the model's graph holds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import onnxruntime_genai as og


def _generator(model: og.Model, max_length: int) -> og.Generator:
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=max_length, min_length=max_length)
    return og.Generator(model, params)


def prefill_s(model: og.Model, ids: list[int]) -> float:
    gen = _generator(model, len(ids) + 2)
    t = time.perf_counter()
    gen.append_tokens(ids)
    dt = time.perf_counter() - t
    del gen
    return dt


def decode_steps_s(model: og.Model, ids: list[int], steps: int) -> tuple[list[float], list[int]]:
    gen = _generator(model, len(ids) + steps + 2)
    gen.append_tokens(ids)
    gen.generate_next_token()  # the first new token, from the prefill's logits
    tokens = [int(gen.get_next_tokens()[0])]
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        gen.generate_next_token()  # forward on the previous token + greedy pick
        times.append(time.perf_counter() - t)
        tokens.append(int(gen.get_next_tokens()[0]))
    del gen
    return times, tokens


def graph_summary(model_dir: Path) -> dict:
    """Op counts of the decoder graph and how its lm_head runs (MatMulNBits: int4/int8; MatMul: float)."""
    try:
        import onnx
    except ImportError:
        return {}
    cfg = json.loads((model_dir / "genai_config.json").read_text())
    graph = onnx.load(str(model_dir / cfg["model"]["decoder"]["filename"]), load_external_data=False).graph
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    head = [n for n in graph.node if "lm_head" in n.name]
    head_info = []
    for n in head:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        head_info.append({"name": n.name, "op": n.op_type,
                          **{k: attrs[k] for k in ("bits", "block_size", "accuracy_level") if k in attrs}})
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    levels = sorted({onnx.helper.get_attribute_value(a) for n in nbits for a in n.attribute
                     if a.name == "accuracy_level"})
    blocks = sorted({onnx.helper.get_attribute_value(a) for n in nbits for a in n.attribute if a.name == "block_size"})
    return {"op_counts": ops, "lm_head_nodes": head_info, "matmulnbits_accuracy_levels": levels,
            "matmulnbits_block_sizes": blocks,
            "lm_head": ("int4" if any(h["op"] == "MatMulNBits" and h.get("bits", 4) == 4 for h in head_info)
                        else "quantized" if any(h["op"] == "MatMulNBits" for h in head_info) else "float")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="folder of the builder's output (genai_config.json)")
    parser.add_argument("--prompts", type=Path, required=True,
                        help='JSON {"prefill": {"32": [ids], ...}, "decode": [ids]}')
    parser.add_argument("--threads", type=int, required=True, help="intra-op threads of the decoder session")
    parser.add_argument("--decode-tokens", type=int, default=64, help="timed greedy decode steps")
    parser.add_argument("--prefill", default="", help="comma-separated prefill lengths to time (keys of prompts)")
    parser.add_argument("--info", action="store_true", help="only describe the model's graph")
    parser.add_argument("--out", type=Path, required=True, help="result JSON")
    args = parser.parse_args()
    out: dict = {"ort_genai_version": og.__version__}
    try:
        import onnxruntime

        out["onnxruntime_version"] = onnxruntime.__version__
    except ImportError:
        out["onnxruntime_version"] = None
    out["graph"] = graph_summary(args.model)
    if args.info:
        args.out.write_text(json.dumps(out, indent=1))
        return
    prompts = json.loads(args.prompts.read_text())
    config = og.Config(str(args.model))
    session = {"intra_op_num_threads": args.threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    out["session_options"] = session
    t = time.perf_counter()
    model = og.Model(config)
    out["load_s"] = time.perf_counter() - t
    lengths = [s for s in args.prefill.split(",") if s]
    for n in lengths:  # warm-up: every prefill length once, then a short decode
        prefill_s(model, prompts["prefill"][n])
    decode_steps_s(model, prompts["decode"], 4)
    out["prefill_s"] = {n: prefill_s(model, prompts["prefill"][n]) for n in lengths}
    if args.decode_tokens > 0:
        out["decode_step_s"], out["decode_ids"] = decode_steps_s(model, prompts["decode"], args.decode_tokens)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
