"""Where one int4 decode step's time goes on CPU: linears, attention, norms, KV cache, head, and the rest.

    python benchmarks/decode_profile.py [--steps 32] [--repeats 3] [--threads 2] [--modes dynamic,static,lean,compiled]
                                        [--fp32] [--no-int4-head] [--smoke]

The model is ``make_tiny`` shaped as NVILA-Lite-2B's LLM (Qwen2-1.5B: 28 layers, hidden 1536, intermediate 8960,
12 heads / 2 KV heads, bf16 weights, 151,936 stored vocabulary rows), RTN-quantized to 4-bit g128 with zero points
in the AutoAWQ format (the LLM's 196 decoder linears; once more with the lm_head too) and loaded with
``NVILAQwen2.load_pretrained`` as ``generate`` loads it. Each run prefills a 32-token prompt and greedy-decodes
``--steps`` tokens through the model's ``DecodeSession`` (as ``timed_run`` does), timing every step.

Configurations: bf16 activations with the float head and the real vocabulary; the same loaded model with its
embedding and head cut to their first 2000 rows (every decoder weight identical); the int4 head (real vocabulary);
with ``--fp32``, fp32 activations. Per configuration:

- plain step wall times for each decode mode (``NVILA_QUANT_DECODE``: dynamic = the eager transformers loop; static;
  lean = the lean step, which ``auto`` runs on CPU; compiled), modes interleaved over ``--repeats`` runs;
- a breakdown (dynamic, static and lean; for lean its native ops and grouped linears are what is timed): leaf modules
  and functions timed with ``time.perf_counter`` by swapping each module's class for a subclass whose ``__call__``
  times the original one (no hooks, so ``QuantLinear`` keeps its eager shortcut to the native kernel) and by wrapping
  ``apply_rotary_pos_emb``, ``create_causal_mask``, the attention function and ``Cache.update``; "rest" is the step's
  wall time minus the timed parts;
- one run under ``torch.profiler`` with the same wrappers as ``record_function`` ranges: the aten ops outside every
  timed part (residual adds, the MLP's gate * up, views, the session's mask bookkeeping) are summed, so the rest
  splits into those ops and pure Python/framework time.

The effective bandwidth of the int4 linears is the bytes they hold (packed weights, scales, zero points, biases) over
their measured time. Writes benchmarks/results/decode_profile/<time>-<machine>[-smoke].json with every step's time
and every step's breakdown.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch
import transformers.models.qwen2.modeling_qwen2 as qwen2
from torch import nn
from transformers.cache_utils import Cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_results_arg, table, write_result  # noqa: E402

from nvila_quant.kernels.linear import QuantLinear  # noqa: E402
from nvila_quant.model import NVILAQwen2  # noqa: E402
from nvila_quant.model.lean_decode import LeanDecoder  # noqa: E402
from nvila_quant.model.static_decode import decode_settings  # noqa: E402
from nvila_quant.quant.rtn import write_rtn_checkpoint  # noqa: E402
from nvila_quant.settings import overrides  # noqa: E402
from nvila_quant.testing.factory import TinySpec, make_tiny  # noqa: E402

VOCAB = 151936  # Qwen2's stored vocabulary rows
SMALL_VOCAB = 2000
PROMPT_TOKENS = 32
SPECS = {  # outliers only change values, not time: skipped (a faster build)
    "qwen2-1.5b": TinySpec(seed=0, variant="nvila-lite", outliers=False, llm_hidden=1536, llm_intermediate=8960,
                           llm_layers=28, llm_heads=12, llm_kv_heads=2, llm_vocab=VOCAB),
    "smoke": TinySpec(seed=0, variant="nvila-lite", outliers=False, llm_layers=2, llm_vocab=VOCAB),
}
# the parts of a step, in table order ("rest" = step wall time minus all of them)
PARTS = ("int4_linear", "attention", "kv_update", "norm", "rotary", "activation", "mask", "embedding", "lm_head",
         "sampling")
BREAKDOWN_MODES = ("dynamic", "static", "lean")  # the modes timed part by part (compiled: a profile only)
PROJ_ATTR = "_profile_proj"  # set on each decoder int4 linear while instrumented: its projection name
PART_NAMES = {"int4_linear": "int4 linears (decoder)", "attention": "attention (sdpa, KV read)",
              "kv_update": "KV-cache update", "norm": "RMSNorm", "rotary": "rotary (cos/sin + apply)",
              "activation": "SiLU", "mask": "causal mask", "embedding": "embedding", "lm_head": "lm_head",
              "sampling": "sampling (argmax)", "rest": "rest (step - parts)"}


# ---- timing the parts of a step ------------------------------------------------------------------------------------

class PartTimer:
    """Seconds and calls per part while active; ``profile`` also opens a ``record_function`` range per timed call."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.by_name: dict[str, float] = defaultdict(float)  # int4 linears by projection name (q_proj, ...)
        self.profile = False

    def snapshot(self) -> tuple[dict[str, float], dict[str, int], dict[str, float]]:
        return dict(self.seconds), dict(self.calls), dict(self.by_name)

    def wrap(self, part: str, fn: Callable) -> Callable:
        """``fn`` timed under ``part``."""
        def timed(*args: object, **kwargs: object) -> object:
            if self.profile:
                with torch.profiler.record_function(f"part::{part}"):
                    return self._call(part, fn, args, kwargs)
            return self._call(part, fn, args, kwargs)
        return timed

    def _call(self, part: str, fn: Callable, args: tuple, kwargs: dict) -> object:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            dt = time.perf_counter() - t
            self.seconds[part] += dt
            self.calls[part] += 1
            name = getattr(args[0], PROJ_ATTR, None) if args else None
            if name is not None:
                self.by_name[name] += dt


def _module_parts(llm: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, part) for every leaf module timed as a whole."""
    head = llm.get_output_embeddings()
    out = [(llm.get_input_embeddings(), "embedding"), (head, "lm_head")]
    for m in llm.modules():
        if m is head:
            continue
        if isinstance(m, QuantLinear):
            out.append((m, "int4_linear"))
        elif isinstance(m, qwen2.Qwen2RMSNorm):
            out.append((m, "norm"))
        elif isinstance(m, qwen2.Qwen2RotaryEmbedding):
            out.append((m, "rotary"))
        elif isinstance(m, qwen2.Qwen2MLP):
            out.append((m.act_fn, "activation"))
    return out


LEAN_OPS = {"add_rmsnorm": "norm", "rope_kv": "rotary", "attend": "attention", "silu_mul": "activation"}


@contextlib.contextmanager
def instrumented(llm: nn.Module, timer: PartTimer, decoder: object = None) -> Iterator[None]:
    """Time the parts of ``llm``'s forward into ``timer`` for the block (everything restored after).

    Modules get a subclass whose ``__call__`` times the original ``__call__`` (no hooks: ``QuantLinear``'s eager
    shortcut to its bound kernel stays taken); functions are replaced where ``modeling_qwen2`` looks them up. A lean
    ``decoder`` also gets its native ops (the RMSNorm part includes the residual add, rotary the KV write) and its
    grouped linears (q+k+v, gate+up) timed."""
    swapped: list[tuple[object, type]] = []
    lean_ops = decoder.ops if isinstance(decoder, LeanDecoder) and decoder.ops is not None else None
    if lean_ops is not None:
        for meth, part in LEAN_OPS.items():  # instance attributes shadow the methods for the block
            setattr(lean_ops, meth, timer.wrap(part, getattr(type(lean_ops), meth).__get__(lean_ops)))
        group_cls = {}
        for qkv, gate_up in decoder.groups:
            for group, name in ((qkv, "q_proj+k_proj+v_proj"), (gate_up, "gate_proj+up_proj")):
                if group is not None:
                    cls = type(group)
                    group_cls.setdefault(cls, type(f"Timed{cls.__name__}", (cls,),
                                                   {"__call__": timer.wrap("int4_linear", cls.__call__)}))
                    group.__class__ = group_cls[cls]
                    setattr(group, PROJ_ATTR, name)
                    swapped.append((group, cls))
    classes: dict[tuple[type, str], type] = {}
    impl = llm.config._attn_implementation
    attn = qwen2.ALL_ATTENTION_FUNCTIONS
    had_local = impl in attn._local_mapping
    old_attn = attn[impl]
    old_rotary, old_mask, old_update = qwen2.apply_rotary_pos_emb, qwen2.create_causal_mask, Cache.update
    try:
        for name, module in llm.named_modules():
            if isinstance(module, QuantLinear) and module is not llm.get_output_embeddings():
                setattr(module, PROJ_ATTR, name.rsplit(".", 1)[-1])
        for module, part in _module_parts(llm):
            cls = type(module)
            if (cls, part) not in classes:
                classes[cls, part] = type(f"Timed{cls.__name__}", (cls,),
                                          {"__call__": timer.wrap(part, cls.__call__)})
            module.__class__ = classes[cls, part]
            swapped.append((module, cls))
        attn[impl] = timer.wrap("attention", old_attn)
        qwen2.apply_rotary_pos_emb = timer.wrap("rotary", old_rotary)
        qwen2.create_causal_mask = timer.wrap("mask", old_mask)
        Cache.update = timer.wrap("kv_update", old_update)
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls
            module.__dict__.pop(PROJ_ATTR, None)
        if lean_ops is not None:
            for meth in LEAN_OPS:
                lean_ops.__dict__.pop(meth, None)
        if had_local:
            attn[impl] = old_attn
        else:
            del attn[impl]
        qwen2.apply_rotary_pos_emb, qwen2.create_causal_mask, Cache.update = old_rotary, old_mask, old_update


# ---- one decode run ---------------------------------------------------------------------------------------------

def _greedy(logits: torch.Tensor) -> torch.Tensor:
    """(1, V) logits -> (1, 1) next id."""
    return logits.argmax(-1, keepdim=True)


def decode_run(model: NVILAQwen2, ids: torch.Tensor, steps: int, timer: PartTimer | None = None,
               around_steps: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict:
    """Prefill ``ids`` (1, T) then ``steps`` greedy decode steps on the model's session, as ``timed_run`` does.

    Returns the prefill and static-decoder setup seconds, each step's wall seconds and, with ``timer``, each step's
    seconds and calls per part."""
    session = model.decode_session
    greedy: Callable[[torch.Tensor], torch.Tensor] = _greedy
    if timer is not None:
        greedy = timer.wrap("sampling", _greedy)
    embeds, _, mask = model.embed_inputs(ids, None, None)
    t0 = time.perf_counter()
    logits = session.extend(embeds, mask, 0, logits_to_keep=1)
    next_id = logits[:, -1].argmax(-1, keepdim=True)
    t1 = time.perf_counter()
    step_s: list[float] = []
    parts: list[dict[str, float]] = []
    calls: list[dict[str, int]] = []
    projs: list[dict[str, float]] = []  # int4 linears' seconds by projection name
    with session.decoding(steps) as step:
        t2 = time.perf_counter()
        with around_steps():
            for _ in range(steps):
                before = timer.snapshot() if timer is not None else None
                t = time.perf_counter()
                next_id = greedy(step(next_id))
                step_s.append(time.perf_counter() - t)
                if timer is not None and before is not None:
                    after = timer.snapshot()
                    parts.append({k: v - before[0].get(k, 0.0) for k, v in after[0].items()})
                    calls.append({k: v - before[1].get(k, 0) for k, v in after[1].items()})
                    projs.append({k: v - before[2].get(k, 0.0) for k, v in after[2].items()})
    out = {"prefill_s": t1 - t0, "decoder_setup_s": t2 - t1, "step_s": step_s}
    if timer is not None:
        out.update(parts_s=parts, part_calls=calls, int4_by_proj_s=projs)
    return out


def _ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


def int4_bytes(llm: nn.Module) -> dict[str, int]:
    """Bytes held by the decoder's int4 linears and by the head: packed weights, scales, zero points, biases."""
    head = llm.get_output_embeddings()
    out: dict[str, int] = defaultdict(int)
    out["lm_head"] = sum(t.numel() * t.element_size() for t in [*head.parameters(), *head.buffers()])
    for name, m in llm.named_modules():
        if isinstance(m, QuantLinear) and m is not head:
            nbytes = sum(t.numel() * t.element_size() for t in m.buffers())
            out["int4_linear"] += nbytes
            out["int4_linear." + name.rsplit(".", 1)[-1]] += nbytes
    return dict(out)


# ---- one configuration ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def decode_mode(model: NVILAQwen2, mode: str, decoders: dict) -> Iterator[None]:
    """``NVILA_QUANT_DECODE=mode`` for the block, with that mode's own static decoder: the session rebuilds its
    decoder when the mode changes, each time at twice the previous cache length (its geometric growth), so
    alternating modes on one session would grow the static cache (and recompile) on every switch."""
    session = model.decode_session
    session.static = decoders.get(mode)
    try:
        with overrides(decode_settings(), mode=mode):
            yield
    finally:
        decoders[mode] = session.static


def profile_config(model: NVILAQwen2, ids: torch.Tensor, modes: list[str], steps: int, repeats: int,
                   profiler_steps: int) -> dict:
    """Plain step times per mode, the perf_counter breakdown (dynamic, static) and one torch.profiler run."""
    llm = model.get_llm()
    out: dict = {"plain": {}, "warmup": {}, "breakdown": {}, "profiler": {}}
    decoders: dict = {}
    for mode in modes:  # warm-up: kernel repacks, the static decoder, the compile
        with decode_mode(model, mode, decoders):
            t = time.perf_counter()
            out["warmup"][mode] = decode_run(model, ids, 4)
            out["warmup"][mode]["wall_s"] = time.perf_counter() - t
    for _ in range(repeats):
        for mode in modes:
            with decode_mode(model, mode, decoders):
                out["plain"].setdefault(mode, []).append(decode_run(model, ids, steps))
    # compiled: the op table only (no wrappers), before the wrappers run (changing the modules makes dynamo recompile)
    for mode in [m for m in modes if m not in BREAKDOWN_MODES]:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        with decode_mode(model, mode, decoders):
            run = decode_run(model, ids, profiler_steps, around_steps=lambda p=prof: p)
        out["profiler"][mode] = {"step_s": run["step_s"], **profiler_summary(prof, profiler_steps)}
    for mode in [m for m in modes if m in BREAKDOWN_MODES]:
        timer = PartTimer()
        with decode_mode(model, mode, decoders), instrumented(llm, timer, decoders.get(mode)):
            decode_run(model, ids, 2, timer)  # warm-up of the wrappers
            out["breakdown"][mode] = [decode_run(model, ids, steps, timer) for _ in range(repeats)]
            timer.profile = True
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            run = decode_run(model, ids, profiler_steps, timer, around_steps=lambda p=prof: p)
        out["profiler"][mode] = {"step_s": run["step_s"], **profiler_summary(prof, profiler_steps)}
    return out


def profiler_summary(prof: torch.profiler.profile, steps: int) -> dict:
    """Per step: aten ops outside every timed part (by op, self CPU time) and the top ops by self CPU time."""
    outside: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.name.startswith("part::") or ev.is_user_annotation:
            continue
        parent, inside = ev.cpu_parent, False
        while parent is not None:
            if parent.name.startswith("part::"):
                inside = True
                break
            parent = parent.cpu_parent
        if not inside:
            outside[ev.name] += ev.self_cpu_time_total / 1e3 / steps  # us -> ms per step
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    return {"outside_parts_ms_per_step": dict(sorted(outside.items(), key=lambda kv: -kv[1])),
            "outside_parts_total_ms_per_step": sum(outside.values()),
            "top_ops": [{"name": e.key, "calls_per_step": e.count / steps,
                         "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps} for e in top]}


def proj_rows(name: str, result: dict, nbytes: dict[str, int]) -> list[dict]:
    """Per projection (summed over the layers): median ms per decode step over the breakdown runs, effective GB/s."""
    rows = []
    for mode, runs in result["breakdown"].items():
        for proj in sorted({k for r in runs for p in r["int4_by_proj_s"] for k in p}):
            ms = statistics.median(p.get(proj, 0.0) for r in runs for p in r["int4_by_proj_s"]) * 1e3
            if ms == 0:  # (a projection the prefill ran one by one, but this mode's steps ran in a group)
                continue
            b = sum(nbytes["int4_linear." + part] for part in proj.split("+"))  # a lean group: its layers' bytes
            rows.append({"config": name, "mode": mode, "proj": proj, "MB": b / 1e6, "ms_per_step": ms,
                         "GBps": b / ms / 1e6})
    return rows


def summarize(name: str, result: dict, nbytes: dict[str, int], head: str) -> list[dict]:
    """Table rows: plain step time per mode, then the breakdown per instrumented mode (medians over all steps)."""
    rows = []
    plain = {mode: _ms([s for r in runs for s in r["step_s"]]) for mode, runs in result["plain"].items()}
    for mode, runs in result["breakdown"].items():
        steps = [s for r in runs for s in r["step_s"]]
        per_step = [p for r in runs for p in r["parts_s"]]
        wall = _ms(steps)
        part_ms = {p: statistics.median(s.get(p, 0.0) for s in per_step) * 1e3 for p in PARTS}
        rest = statistics.median(st - sum(p.values()) for st, p in zip(steps, per_step, strict=True)) * 1e3
        outside = result["profiler"][mode]["outside_parts_total_ms_per_step"]
        profiled = _ms(result["profiler"][mode]["step_s"])
        row = {"config": name, "mode": mode, "head": head, "plain_ms": plain[mode], "instrumented_ms": wall,
               "profiled_ms": profiled,
               **{f"{p}_ms": v for p, v in part_ms.items()}, "rest_ms": rest,
               "rest_untimed_ops_ms": outside, "int4_GBps": nbytes["int4_linear"] / part_ms["int4_linear"] / 1e6,
               "lm_head_GBps": nbytes["lm_head"] / part_ms["lm_head"] / 1e6}
        rows.append(row)
    for mode, ms in plain.items():
        if mode not in result["breakdown"]:
            rows.append({"config": name, "mode": mode, "head": head, "plain_ms": ms})
    return rows


# ---- the whole run --------------------------------------------------------------------------------------------------

def _cut_vocab(model: NVILAQwen2, rows: int) -> None:
    """Keep the first ``rows`` rows of the (float) embedding and head, in place."""
    llm = model.get_llm()
    emb, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    if isinstance(head, QuantLinear):
        raise ValueError("cutting the vocabulary needs the float head")
    new_emb = nn.Embedding(rows, emb.weight.shape[1], dtype=emb.weight.dtype)
    new_emb.weight = nn.Parameter(emb.weight[:rows].clone(), requires_grad=False)
    new_head = nn.Linear(head.in_features, rows, bias=head.bias is not None, dtype=head.weight.dtype)
    new_head.weight = nn.Parameter(head.weight[:rows].clone(), requires_grad=False)
    if head.bias is not None:
        new_head.bias = nn.Parameter(head.bias[:rows].clone(), requires_grad=False)
    llm.set_input_embeddings(new_emb)
    llm.set_output_embeddings(new_head)
    llm.config.vocab_size = rows


def build(spec: TinySpec, workdir: Path, int4_head: bool) -> dict[str, Path]:
    """The float checkpoint and its RTN int4 ones under ``workdir`` (those already there, from an earlier run with the
    same ``--workdir``, are reused)."""
    src = workdir / "float"
    if not (src / "llm").is_dir():
        make_tiny(src, spec)
    out = {"float head": (workdir / "int4", False)}
    if int4_head:
        out["int4 head"] = (workdir / "int4-head", True)
    for folder, head in out.values():
        if not (folder / "llm").is_dir():
            write_rtn_checkpoint(src, folder, "autoawq", bits=4, group_size=128, quantize_lm_head=head)
    return {name: folder for name, (folder, _) in out.items()}


def run(spec_name: str, workdir: Path, modes: list[str], steps: int, repeats: int, profiler_steps: int,
        fp32: bool, int4_head: bool) -> dict:
    spec = SPECS[spec_name]
    t = time.perf_counter()
    ckpt = build(spec, workdir, int4_head)
    build_s = time.perf_counter() - t
    # ordinary tokens of the tiny tokenizer (no special or media ids), all below SMALL_VOCAB
    ids = torch.randint(10, 900, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    # (name, checkpoint, activation dtype, vocab rows kept (None: all), decode modes)
    eager = [m for m in modes if m in BREAKDOWN_MODES]  # the other configurations: the modes timed part by part
    configs = [(f"bf16 vocab {VOCAB}", "float head", torch.bfloat16, None, modes),
               (f"bf16 vocab {SMALL_VOCAB}", "float head", torch.bfloat16, SMALL_VOCAB, eager)]
    if int4_head:
        configs.append((f"bf16 vocab {VOCAB} int4 head", "int4 head", torch.bfloat16, None, eager))
    if fp32:
        configs.append((f"fp32 vocab {VOCAB}", "float head", torch.float32, None, eager))
    results, rows, projs, model, loaded = {}, [], [], None, None
    for name, head, dtype, vocab, cfg_modes in configs:
        if loaded != (head, dtype):
            model = None
            gc.collect()
            t = time.perf_counter()
            model = NVILAQwen2.load_pretrained(ckpt[head], torch_dtype=dtype, device="cpu")
            load_s, loaded = time.perf_counter() - t, (head, dtype)
        if vocab is not None:
            _cut_vocab(model, vocab)
        llm = model.get_llm()
        nbytes = int4_bytes(llm)
        res = profile_config(model, ids, cfg_modes, steps, repeats, profiler_steps)
        res.update(checkpoint=head, activations=str(dtype).removeprefix("torch."), vocab=llm.config.vocab_size,
                   load_s=load_s, bytes=nbytes, int4_linears=sum(isinstance(m, QuantLinear) for m in llm.modules()),
                   attn_implementation=llm.config._attn_implementation)
        results[name] = res
        rows += summarize(name, res, nbytes, head)
        projs += proj_rows(name, res, nbytes)
        if vocab is not None:  # the cut model is not the checkpoint any more
            model, loaded = None, None
    sizes = {k: v for k, v in asdict(spec).items() if k.startswith("llm_")}
    return {"spec": spec_name, "spec_sizes": sizes, "format": "autoawq", "bits": 4, "group_size": 128,
            "prompt_tokens": PROMPT_TOKENS, "steps": steps, "repeats": repeats, "profiler_steps": profiler_steps,
            "modes": modes, "build_s": build_s, "rows": rows, "proj_rows": projs, "configs": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32, help="decode steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode and per breakdown")
    parser.add_argument("--profiler-steps", type=int, default=8, help="decode steps in the torch.profiler run")
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads")
    parser.add_argument("--modes", default="dynamic,static,lean,compiled",
                        help="decode modes timed plainly on the real-vocabulary bf16 model (comma-separated; "
                             "dynamic, static and lean also get the breakdown, and are the modes of the other "
                             "configurations)")
    parser.add_argument("--fp32", action="store_true", help="also fp32 activations (real vocabulary, float head)")
    parser.add_argument("--no-int4-head", action="store_true", help="skip the int4-head checkpoint")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer tiny LLM, few steps (a self-check)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the synthetic checkpoints in DIR/<spec> and reuse them on the next run (default: a "
                             "temporary folder)")
    add_results_arg(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := sorted(set(modes) - {*BREAKDOWN_MODES, "compiled"}):
        raise SystemExit(f"--modes: unknown {unknown}; CPU decode modes are dynamic, static, lean, compiled")
    steps, repeats, profiler_steps = (4, 1, 2) if args.smoke else (args.steps, args.repeats, args.profiler_steps)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    spec = "smoke" if args.smoke else "qwen2-1.5b"
    with contextlib.ExitStack() as stack:
        workdir = args.workdir / spec if args.workdir else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="nvq-decode-profile-")))
        stack.enter_context(torch.inference_mode())
        result = run(spec, workdir, modes, steps, repeats, profiler_steps, args.fp32, not args.no_int4_head)
    result["threads"] = torch.get_num_threads()
    result["load_average_start"] = load
    result["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(format_rows(result["rows"]))
    print(table(result["proj_rows"], ["config", "mode", "proj", "MB", "ms_per_step", "GBps"]))
    path = write_result("decode_profile", result, "smoke" if args.smoke else None, "cpu", args.results)
    print(f"wrote {path}")


def format_rows(rows: list[dict]) -> str:
    """The step table: one line per (configuration, mode), milliseconds per decode step."""
    cols = ["config", "mode", "plain_ms", "instrumented_ms", "profiled_ms", *[f"{p}_ms" for p in PARTS], "rest_ms",
            "rest_untimed_ops_ms", "int4_GBps", "lm_head_GBps"]
    return table(rows, cols)


if __name__ == "__main__":
    main()
