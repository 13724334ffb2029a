"""Int4 linear kernels vs dense F.linear, same run: every available backend, ratios, goals.

    python benchmarks/kernels.py [--tokens 1 8 32 128 512] [--repeats 7] [--threads T] [--clock wall|thread]

For (N, K) in {(4096, 4096), (11008, 4096), (4096, 11008)} and each token count M: the quantized layer with
each backend ("cpu" as shipped, a module call, with bf16 and with fp32 activations; each CPU path called alone: the
fused kernel (T16 on these shapes), torch's int4 kernel and the chunked dequantize + dense bf16 path, which locates any
threshold; "reference" on the smallest shape), against a dense bf16 and an fp32 ``F.linear`` with the same weights.
Timings are interleaved medians.
CPU caches (``--cache``): "decode" (default) reads 128 MB before each timed call, then runs the same function once on a
twin (the same kind of layer and input, other memory): as in a decode step, the layer's weights, scales and own
Python objects are cold while the code, the objects every layer shares and the OpenMP threads are warm from the
previous layer; at M = 1 the shipped path and the dense ones are also timed "cold" (nothing primed: code, interpreter
and allocator state evicted too, which no decode step after the first layer sees) and, third, on rings of distinct
copies of each layer (about ``--ring-mb`` MB per kind, more than the last-level cache) called back to back as a decode
step calls its layers, nothing evicted or primed by the benchmark; all three are reported side by side. "cold"
times everything that way, "warm" evicts nothing (int4 weights of small layers then stay in L3, dense ones do not).
``--threads 1 --clock thread`` times this thread's CPU time, which stays meaningful on a shared machine.
On a GPU: the CUDA kernels vs fp16 cuBLAS, kernel time from CUDA-graph replays with the L2 flushed (host
dispatch excluded) and eager time per call, and the fraction of the measured copy bandwidth at M = 1; in the same
run the fused kernel forced where the runtime dequantizes + cuBLAS, and the nibble-row GEMV for M <= 4
(``--ksplit`` fixes the mma kernel's K slices).
Writes one result file per run, benchmarks/results/kernels/<time>-<machine>[-<T>thread][-cputime].json, with every
timed sample next to the medians (``samples_ms`` in each row, in its ``all_cold`` and ``ring`` measures, and the GPU's
CUDA-graph and eager samples).

    python benchmarks/kernels.py --activations [--tokens 1 4] [--rounds 15] [--ring-mb 512]

instead compares the few-token T16 kernels' handling of the activations on the NVILA-Lite-2B LLM's shapes
(``ACT_SHAPES``), each kernel called directly (ctypes, no module): bf16 x on vdpbf16ps ("avx512_bf16"), on VNNI as two
int8 parts ("vnni_x2", exact to bf16 rounding) and as one int8 per element ("vnni_int8",
``NVILA_QUANT_CPU_ACTIVATIONS=int8``); fp32 x with FMA ("avx512_fma"), as two 15-bit parts ("vnni_x4") and as one
int8 ("vnni_int8_f32"). The weights are a ring of distinct copies (about ``--ring-mb`` MB, more than the last-level
cache) called back to back, so each call reads its weights from DRAM as in decode; the kernels take turns, one pass
over the ring each per round; with them, a bare read of the same bytes (``nq_read_bytes``: every byte loaded into a
vector, nothing computed), the yardstick the 1-token bf16 kernel is held to (``BARE_READ_GOAL``). Reports ms per call
(median of every call of every round; the spread of the rounds' medians as noise) and GB/s of weight bytes (int4 +
scales + zero points); result variant "activations". On a shared machine: ``--threads 1 --clock thread``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_results_arg, table, write_result  # noqa: E402

from nvila_quant.kernels.cpu import dispatch as cpu_backend  # noqa: E402
from nvila_quant.kernels.cpu import native as cpu_native  # noqa: E402
from nvila_quant.kernels.cpu.native import native_available, native_linear  # noqa: E402
from nvila_quant.kernels.cpu.settings import cpu_settings  # noqa: E402
from nvila_quant.kernels.cuda import dispatch as cuda_dispatch  # noqa: E402
from nvila_quant.kernels.cuda import native as cuda_native  # noqa: E402
from nvila_quant.kernels.cuda.dispatch import GEMV_MAX_TOKENS  # noqa: E402
from nvila_quant.kernels.cuda.settings import cuda_settings  # noqa: E402
from nvila_quant.kernels.linear import QuantLinear  # noqa: E402
from nvila_quant.numerics import QTensor  # noqa: E402
from nvila_quant.numerics.nibbles import unpack_nibbles  # noqa: E402
from nvila_quant.settings import overrides  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
CPU_GOALS = {"m1_vs_bf16": 3.5, "m1_vs_fp32": 6.0, "max_slowdown_vs_bf16": 1.1}
GPU_GOALS = {"gemv_bandwidth_fraction_m1": 0.7, "gemm_vs_cublas_fp16_m512": 0.8}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


CLOCK = {"fn": time.perf_counter}  # --clock thread: time.thread_time (CPU time of this thread; 1 thread only)
FLUSH: dict[str, torch.Tensor | None] = {"buf": None}  # read before each timed call: weights start cold
CACHE = {"mode": "decode"}  # --cache


def _flush_caches() -> None:
    if FLUSH["buf"] is not None:  # read, not written: a decode step's caches hold clean lines (weights), so the
        FLUSH["buf"].sum()  # timed call should not pay for writing back 128 MB of dirty ones


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                primers: dict[str, Callable[[], object]] | None = None,
                samples: dict[str, list[float]] | None = None) -> dict[str, float]:
    """Median milliseconds of each fn, run round-robin so background load hits all of them alike; ``primers[name]``
    runs untimed between the cache eviction and the timed call of ``name``. ``samples``, when given, receives every
    timed call's milliseconds per name."""
    clock = CLOCK["fn"]
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _flush_caches()
            if primers and name in primers:
                primers[name]()
            _sync()
            t = clock()
            fn()
            _sync()
            times[name].append((clock() - t) * 1e3)
    if samples is not None:
        samples.update(times)
    return {k: statistics.median(v) for k, v in times.items()}


def _layer(n: int, k: int, group: int, device: str = "cpu") -> QuantLinear:
    gen = torch.Generator().manual_seed(n + k)
    qt = QTensor.from_float(torch.randn(n, k, generator=gen) * 0.02, 4, group, True, scale_dtype=torch.bfloat16)
    return QuantLinear.from_qtensor(qt).to(device)


def _fused_gemm(layer: QuantLinear, x: torch.Tensor) -> Callable[[], object]:
    """The layer with the CUDA backend's fused GEMM kernel forced (NVILA_QUANT_CUDA_GEMM=fused)."""
    def run() -> object:
        with overrides(cuda_settings(), gemm="fused"):
            return layer(x)
    return run


def _cpu_case(layer: QuantLinear, ref: QuantLinear | None, x16: torch.Tensor, w16: torch.Tensor,
              w32: torch.Tensor, torch_w: cpu_backend.TorchInt4Weights | None) -> dict[str, Callable[[], object]]:
    """The shipped path and each CPU path alone, called directly (no global overrides, which would make the
    layers re-plan between calls)."""
    x32 = x16.float()
    state = layer._prepared["cpu"]
    plan = state.plan(layer.q, torch.bfloat16)
    if plan.bound is not None:
        fused = lambda: plan.bound(x16)  # noqa: E731
    else:
        fused = lambda: native_linear(x16, layer.q, state.scale, state.zero, state.bias, state.group)  # noqa: E731
    fns = {
        "cpu": lambda: layer(x16),
        "cpu_fp32_act": lambda: layer(x32),  # fp32 activations (the fp32 T16 kernel on these shapes)
        "cpu_int4_kernel": fused,
        "cpu_dequant_dense": lambda: cpu_backend.dense_chunked(x16, layer.q, state, torch.bfloat16),
        "dense_bf16": lambda: F.linear(x16, w16),
        "dense_fp32": lambda: F.linear(x32, w32),
    }
    if plan.bound is not None and cpu_native.amx_active():  # the same kernel with AMX off: AVX-512 at every M
        def avx512_only() -> object:
            with cpu_native.avx512_bf16_only():
                return plan.bound(x16)
        fns["cpu_t16_avx512"] = avx512_only
    if torch_w is not None:
        fns["torch_int4_kernel"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x16, torch_w.packed, torch_w.group, torch_w.scales_and_zeros)
    if ref is not None:
        fns["reference"] = lambda: ref(x16)
    return fns


def _cpu_objects(layer: QuantLinear, group: int) -> tuple:
    """(layer planned for the cpu backend, dense bf16 / fp32 weights, torch's int4 weights or None) of ``layer``."""
    layer.backend = "cpu"
    k = layer.in_features
    w16 = layer.dequantize_weight(torch.bfloat16)
    w32 = layer.dequantize_weight(torch.float32)
    torch_w = None
    if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        torch_w = cpu_backend.prepare_torch_int4(unpack_nibbles(layer.nibble_rows()), layer.scale, layer.zero, group)
    layer(torch.zeros(1, k, dtype=torch.bfloat16))  # plans the layer (and packs its weights) once
    return layer, w16, w32, torch_w


ALL_COLD = ("cpu", "cpu_fp32_act", "dense_bf16", "dense_fp32")  # also timed with nothing primed at M = 1
RING = {"mb": 1024}  # --ring-mb


def ring_m1(layer: QuantLinear, w16: torch.Tensor, w32: torch.Tensor, rounds: int = 3) -> dict[str, float]:
    """Median ms per call at M = 1 with each kind's layers in a ring of distinct copies (~RING["mb"] MB each, more
    than the last-level cache) called back to back, as a decode step calls its layers: a call finds the other layers'
    weights, not its own, in the caches, and nothing is evicted or primed by the benchmark. The kinds' rings take
    turns, ``rounds`` passes each."""
    n, k = layer.out_features, layer.in_features
    qt = layer.qtensor()

    def copies(nbytes: int) -> int:
        return max(2, RING["mb"] * 2**20 // nbytes)

    def planned() -> QuantLinear:  # a copy in its own memory, planned for bf16 and fp32 activations
        copy = QuantLinear.from_qtensor(qt, backend="cpu")
        copy(torch.zeros(1, k, dtype=torch.bfloat16))
        copy(torch.zeros(1, k))
        return copy

    int4 = [layer] + [planned() for _ in range(copies(n * k // 2) - 1)]
    d16 = [w16] + [w16.clone() for _ in range(copies(n * k * 2) - 1)]
    d32 = [w32] + [w32.clone() for _ in range(copies(n * k * 4) - 1)]
    x16 = torch.randn(1, k).bfloat16()
    x32 = x16.float()
    rings = {"cpu": [lambda q=q: q(x16) for q in int4], "cpu_fp32_act": [lambda q=q: q(x32) for q in int4],
             "dense_bf16": [lambda w=w: F.linear(x16, w) for w in d16],
             "dense_fp32": [lambda w=w: F.linear(x32, w) for w in d32]}
    clock = CLOCK["fn"]
    times: dict[str, list[float]] = {name: [] for name in rings}
    for r in range(rounds + 1):  # the first pass warms up
        for name, calls in rings.items():
            for call in calls:
                t = clock()
                call()
                if r:
                    times[name].append((clock() - t) * 1e3)
    out = {f"{name}_ms": statistics.median(v) for name, v in times.items()}
    out["samples_ms"] = times  # every call of every pass after the first, per kind
    out["layers_per_ring"] = {"int4": len(int4), "dense_bf16": len(d16), "dense_fp32": len(d32)}
    out["x_vs_bf16"], out["x_vs_fp32"] = out["dense_bf16_ms"] / out["cpu_ms"], out["dense_fp32_ms"] / out["cpu_ms"]
    out["fp32_act_x_vs_fp32"] = out["dense_fp32_ms"] / out["cpu_fp32_act_ms"]
    return out


def bench_cpu(tokens: list[int], repeats: int, group: int) -> list[dict]:
    rows = []
    decode = CACHE["mode"] == "decode"
    for n, k in SHAPES:
        layer, w16, w32, torch_w = _cpu_objects(_layer(n, k, group), group)
        # the primers' twin: equal values in other memory (the timed layer's data stays cold)
        twin = _cpu_objects(QuantLinear.from_qtensor(layer.qtensor()), group) if decode else None
        for m in tokens:
            x16 = torch.randn(m, k).bfloat16()
            small = (n, k) == SHAPES[0] and m <= 8  # the reference, and its twin's (other memory)
            ref, ref2 = (QuantLinear.from_qtensor(layer.qtensor(), backend="reference") if small else None
                         for _ in "ab")
            fns = _cpu_case(layer, ref, x16, w16, w32, torch_w)
            primers = None if twin is None else _cpu_case(twin[0], ref2, x16.clone(), *twin[1:])
            # the oracle is timed in its own loop: its dequantize allocates and frees the whole dense weight, and a
            # call after that (cache eviction and priming between) ran ~7% slower than after a kernel call
            oracle = {"reference": fns.pop("reference")} if "reference" in fns else {}
            oracle_primer = {"reference": primers.pop("reference")} if oracle and primers else None
            # (a median of 3 fell to two hiccups)
            samples: dict[str, list[float]] = {}
            ms = interleaved(fns, repeats if m <= 128 else max(5, repeats // 2), primers=primers, samples=samples)
            if oracle:
                ms |= interleaved(oracle, repeats, primers=oracle_primer, samples=samples)
            row = {"N": n, "K": k, "M": m, **{f"{name}_ms": v for name, v in ms.items()}, "samples_ms": samples}
            plan = layer._prepared["cpu"].plan(layer.q, torch.bfloat16)
            row["path"] = plan.kernel if plan.kernel and m < plan.dense_from else "dense"
            if row["path"] == "native-t16":
                row["path"] = f"t16 {cpu_native.t16_route(torch.bfloat16, m)}"
            row["x_vs_bf16"] = ms["dense_bf16"] / ms["cpu"]
            row["x_vs_fp32"] = ms["dense_fp32"] / ms["cpu"]
            row["fp32_act_x_vs_fp32"] = ms["dense_fp32"] / ms["cpu_fp32_act"]
            cold = ""
            if decode and m == 1:
                cold_samples: dict[str, list[float]] = {}
                cms = interleaved({name: fns[name] for name in ALL_COLD}, repeats, samples=cold_samples)
                row["all_cold"] = {**{f"{name}_ms": v for name, v in cms.items()},
                                   "x_vs_bf16": cms["dense_bf16"] / cms["cpu"],
                                   "x_vs_fp32": cms["dense_fp32"] / cms["cpu"], "samples_ms": cold_samples}
                cold = (f"; all cold: cpu {cms['cpu']:.2f} ms, {row['all_cold']['x_vs_bf16']:.2f}x / "
                        f"{row['all_cold']['x_vs_fp32']:.2f}x")
                if RING["mb"]:
                    ring = row["ring"] = ring_m1(layer, w16, w32)
                    cold += (f"; ring: cpu {ring['cpu_ms']:.2f} ms, {ring['x_vs_bf16']:.2f}x / "
                             f"{ring['x_vs_fp32']:.2f}x "
                             f"(fp32 activations {ring['fp32_act_x_vs_fp32']:.2f}x fp32)")
            rows.append(row)
            print(f"  N={n} K={k} M={m}: cpu {ms['cpu']:.2f} ms ({row['path']}), bf16 {ms['dense_bf16']:.2f}, "
                  f"fp32 {ms['dense_fp32']:.2f} -> {row['x_vs_bf16']:.2f}x / {row['x_vs_fp32']:.2f}x; fp32 activations "
                  f"{ms['cpu_fp32_act']:.2f} ms, {row['fp32_act_x_vs_fp32']:.2f}x fp32{cold}", flush=True)
    return rows


def crossover(rows: list[dict]) -> dict[str, int | None]:
    """Smallest M per shape where dequantize + dense beats the int4 kernel."""
    out = {}
    for n, k in SHAPES:
        ms = [r["M"] for r in rows
              if (r["N"], r["K"]) == (n, k) and r["cpu_dequant_dense_ms"] < r["cpu_int4_kernel_ms"]]
        out[f"{n}x{k}"] = min(ms) if ms else None
    return out


def check_cpu_goals(rows: list[dict]) -> dict:
    m1 = [r for r in rows if r["M"] == 1]
    measures = {"": m1, "all_cold_": [r["all_cold"] for r in m1 if "all_cold" in r],
                "ring_": [r["ring"] for r in m1 if "ring" in r]}  # the M = 1 measures: ratios of each
    mins = {f"m1_{tag}vs_{base}_min": min(r[f"x_vs_{base}"] for r in ms) if ms else None
            for tag, ms in measures.items() for base in ("bf16", "fp32")}

    def m1_met(ms: list[dict]) -> dict[str, bool | None]:  # None: no M = 1 rows in this measure
        return {f"m1_vs_{base}": all(r[f"x_vs_{base}"] >= CPU_GOALS[f"m1_vs_{base}"] for r in ms) if ms else None
                for base in ("bf16", "fp32")}

    return {
        **mins,
        "worst_slowdown_vs_bf16": max(r["cpu_ms"] / r["dense_bf16_ms"] for r in rows),
        "goals": CPU_GOALS,
        "met": {**m1_met(m1), "no_m_slower_than_1.1x_bf16": all(
            r["cpu_ms"] <= CPU_GOALS["max_slowdown_vs_bf16"] * r["dense_bf16_ms"] for r in rows)},
        # the M = 1 goals, measured on the rings (back-to-back calls)
        "met_on_rings": m1_met(measures["ring_"]) if measures["ring_"] else None,
    }


def graph_ms(fn: Callable[[], object], reps: int = 30, samples: dict | None = None) -> float:
    """Median GPU time (ms) of one call with a cold L2, without host overhead: CUDA-graph replays of (zero a
    256 MB buffer, call) minus replays of the zeroing alone, each bracketed by CUDA events. ``samples``, when given,
    receives every replay's milliseconds (``with_call``, ``flush_only``)."""
    flush = torch.empty(256 * 1024**2, dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream before capture
        for _ in range(3):
            flush.zero_()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    with_call, flush_only = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(with_call):
        flush.zero_()
        fn()
    with torch.cuda.graph(flush_only):
        flush.zero_()

    def replay_ms(graph: torch.cuda.CUDAGraph) -> list[float]:
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times

    both, alone = [], []
    for _ in range(3):  # alternate so clocks and background hit both alike
        both += replay_ms(with_call)
        alone += replay_ms(flush_only)
    if samples is not None:
        samples.update(with_call=both, flush_only=alone)
    return max(statistics.median(both) - statistics.median(alone), 1e-4)


def measured_bandwidth_gbs(samples: dict | None = None) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), from CUDA-graph replays."""
    a = torch.empty(1024**3, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / (graph_ms(lambda: b.copy_(a), samples=samples) / 1e3) / 1e9


def bench_gpu(tokens: list[int], repeats: int, group: int) -> dict:
    """Kernel time (CUDA graphs, cold L2: what a captured decode step pays) and eager time per call (host
    dispatch included: what an uncaptured PyTorch loop pays), int4 CUDA vs fp16 cuBLAS, same shapes."""
    bw_samples: dict[str, list[float]] = {}
    bw = measured_bandwidth_gbs(bw_samples)
    rows = []
    for n, k in SHAPES:
        layer = _layer(n, k, group, "cuda")
        layer.backend = "cuda"
        layer.prepare("cuda", torch.float16)
        w16 = layer.dequantize_weight(torch.float16)
        nibble_rows = cuda_dispatch.prepare_cuda(layer.nibble_rows(), layer.scale, layer.zero, group, k)
        for m in tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            fns = {"cuda": lambda: layer(x), "cublas_fp16": lambda: F.linear(x, w16)}  # noqa: B023
            graph_samples: dict[str, dict] = {name: {} for name in fns}
            kernel = {name: graph_ms(fn, samples=graph_samples[name]) for name, fn in fns.items()}
            fused_max = cuda_settings().mma_max_tokens if layer.q_layout == "mma" else GEMV_MAX_TOKENS
            if m > fused_max:  # the runtime dequantizes + cuBLAS there; the fused kernel forced, for comparison
                graph_samples["cuda_fused_gemm"] = {}
                kernel["cuda_fused_gemm"] = graph_ms(_fused_gemm(layer, x), samples=graph_samples["cuda_fused_gemm"])
            if m <= GEMV_MAX_TOKENS:  # the nibble-row GEMV (the path before the mma layout), same run
                out = torch.empty(m, n, device="cuda", dtype=torch.float16)
                graph_samples["cuda_rows_gemv"] = {}
                kernel["cuda_rows_gemv"] = graph_ms(
                    lambda: cuda_native.rows_launch(x, nibble_rows.qweight, nibble_rows.scales, nibble_rows.zeros, None,  # noqa: B023
                                             group, out), samples=graph_samples["cuda_rows_gemv"])  # noqa: B023
            eager_samples: dict[str, list[float]] = {}
            eager = interleaved(fns, repeats, samples=eager_samples)
            bytes_moved = n * k // 2 + layer.scale.numel() * 4 + layer.zero.numel() + m * (k + n) * 2
            rows.append({"N": n, "K": k, "M": m, "cuda_ms": kernel["cuda"], "cublas_fp16_ms": kernel["cublas_fp16"],
                         "x_vs_fp16": kernel["cublas_fp16"] / kernel["cuda"],
                         "bandwidth_fraction": bytes_moved / (kernel["cuda"] / 1e3) / 1e9 / bw,
                         "cuda_fused_gemm_ms": kernel.get("cuda_fused_gemm"),
                         "cuda_rows_gemv_ms": kernel.get("cuda_rows_gemv"), "layout": layer.q_layout,
                         "eager_cuda_ms": eager["cuda"], "eager_cublas_fp16_ms": eager["cublas_fp16"],
                         "samples_ms": {"graph": graph_samples, "eager": eager_samples}})
    m1 = [r for r in rows if r["M"] == 1]
    big = [r for r in rows if r["M"] >= 512]
    out = {"device": torch.cuda.get_device_name(0), "copy_bandwidth_gbs": bw, "copy_bandwidth_samples_ms": bw_samples,
           "rows": rows, "goals": GPU_GOALS,
           "timing": "cuda_ms / cublas_fp16_ms: CUDA-graph replays with L2 flushed, minus the flush; eager_*: "
                     "wall clock per call with host dispatch",
           "gemv_bandwidth_fraction_m1_min": min(r["bandwidth_fraction"] for r in m1) if m1 else None,
           "gemm_vs_cublas_fp16_m512_min": min(r["x_vs_fp16"] for r in big) if big else None}
    out["met"] = {"gemv_bandwidth_fraction_m1":
                      (out["gemv_bandwidth_fraction_m1_min"] or 0) >= GPU_GOALS["gemv_bandwidth_fraction_m1"],
                  "gemm_vs_cublas_fp16_m512":
                      (out["gemm_vs_cublas_fp16_m512_min"] or 0) >= GPU_GOALS["gemm_vs_cublas_fp16_m512"]}
    return out


ACT_SHAPES = [(8960, 1536), (1536, 8960), (2048, 1536), (1536, 1536)]  # NVILA-Lite-2B: gate/up, down, qkv, o
ACT_SHAPE_SETS = {"2b": ACT_SHAPES, "8b": [(18944, 3584), (3584, 18944), (4608, 3584), (3584, 3584)]}  # NVILA-8B
ACT_KERNELS = {  # name: (C function, activation dtype)
    "avx512_bf16": ("nq_t16_bf16", torch.bfloat16), "vnni_x2": ("nq_t16_bf16_vnni", torch.bfloat16),
    "vnni_int8": ("nq_t16_bf16_vnni8", torch.bfloat16), "avx512_fma": ("nq_t16_f32", torch.float32),
    "vnni_x4": ("nq_t16_f32_vnni", torch.float32), "vnni_int8_f32": ("nq_t16_f32_vnni8", torch.float32)}


def _ring_pass(fn: Callable, ring: list[tuple[torch.Tensor, ...]], x: torch.Tensor, out: torch.Tensor,
               sizes: tuple[int, ...]) -> list[float]:
    """Milliseconds of each call of the T16 kernel ``fn`` over one pass of the ring of (q, scale, zero) copies, called
    back to back; ``sizes`` = (N, K, group, threads, scale kind)."""
    n, k, group, threads, kind = sizes
    m = x.shape[0]
    clock = CLOCK["fn"]
    times = []
    for q, sc, z in ring:
        t = clock()
        rc = fn(x.data_ptr(), q.data_ptr(), sc.data_ptr(), z.data_ptr(), None, out.data_ptr(), m, n, k, group,
                threads, kind)
        times.append((clock() - t) * 1e3)
        if rc:
            raise RuntimeError(f"{fn.__name__} returned {rc}")
    return times


BARE_READ_GOAL = 1.25  # issue 26: the 1-token GEMV at these shapes within this factor of a bare read of its bytes


def _read_pass(lib: object, ring: list[tuple[torch.Tensor, ...]], threads: int) -> list[float]:
    """Milliseconds of a bare read (``nq_read_bytes``: every byte loaded, nothing computed) of each ring entry's
    weights, scales and zero points, back to back as ``_ring_pass`` calls the kernels."""
    fn = lib.nq_read_bytes
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int], ctypes.c_uint64
    clock = CLOCK["fn"]
    times = []
    for tensors in ring:
        t = clock()
        for x in tensors:
            nbytes = x.numel() * x.element_size() // 64 * 64
            if nbytes:
                fn(x.data_ptr(), nbytes, threads)
        times.append((clock() - t) * 1e3)
    return times


def bench_activations(tokens: list[int], rounds: int, group: int,
                      shapes: list[tuple[int, int]] = ACT_SHAPES) -> list[dict]:
    """Per (N, K) of ACT_SHAPES and token count: ms per call and GB/s of each ACT_KERNELS kernel on a ring of
    distinct weight copies (RING["mb"] MB), interleaved per round (see the module docstring)."""
    lib = cpu_native.library()
    caps = cpu_native.native_caps()
    if lib is None or not caps & cpu_native.CAP_VNNI or not caps & cpu_native.CAP_BF16:
        raise SystemExit("--activations needs the native kernels with AVX-512 BF16 and VNNI")
    threads = torch.get_num_threads()
    rows = []
    # the dispatchers (nq_t16_bf16 / nq_t16_f32) on vdpbf16ps / FMA at every count, and the VNNI route exact
    with cpu_native.avx512_bf16_only():
        for n, k in shapes:
            layer = _layer(n, k, group)
            layer.backend = "cpu"
            layer(torch.zeros(1, k, dtype=torch.bfloat16))  # packs the weights (T16) once
            state = layer._prepared["cpu"]
            weight_bytes = layer.q.numel() + state.scale.numel() * state.scale.element_size() + state.zero.numel()
            copies = max(2, RING["mb"] * 2**20 // weight_bytes)
            ring = [(layer.q, state.scale, state.zero)] + [
                (layer.q.clone(), state.scale.clone(), state.zero.clone()) for _ in range(copies - 1)]
            kind = cpu_native.SCALE_KINDS[state.scale.dtype]
            for m in tokens:
                x16 = torch.randn(m, k).bfloat16()
                xs = {torch.bfloat16: x16, torch.float32: x16.float()}
                outs = {dt: torch.empty(m, n, dtype=dt) for dt in xs}

                samples: dict[str, list[list[float]]] = {name: [] for name in (*ACT_KERNELS, "bare_read")}
                for r in range(rounds + 1):  # the first round warms up
                    for name, (fn, dt) in ACT_KERNELS.items():
                        ms = _ring_pass(getattr(lib, fn), ring, xs[dt], outs[dt], (n, k, group, threads, kind))
                        if r:
                            samples[name].append(ms)
                    ms = _read_pass(lib, ring, threads)
                    if r:
                        samples["bare_read"].append(ms)
                row: dict = {"N": n, "K": k, "M": m, "weight_bytes": weight_bytes, "ring_copies": len(ring)}
                for name, passes in samples.items():
                    med = statistics.median(t for p in passes for t in p)  # every call of every round
                    rounds_med = [statistics.median(p) for p in passes]
                    row[f"{name}_ms"] = med
                    row[f"{name}_gbs"] = weight_bytes / (med / 1e3) / 1e9
                    # noise: the rounds' medians, (max - min) / the median of all calls
                    row[f"{name}_spread"] = (max(rounds_med) - min(rounds_med)) / med
                    row[f"{name}_round_medians_ms"] = rounds_med
                # the yardstick of issue 26: the shipped bf16 kernel within BARE_READ_GOAL x a bare read of the bytes
                row["avx512_bf16_vs_bare_read"] = row["avx512_bf16_ms"] / row["bare_read_ms"]
                row["samples_ms"] = samples
                rows.append(row)
                print(f"  N={n} K={k} M={m}: " + ", ".join(
                    f"{name} {row[f'{name}_ms']:.3f} ms ({row[f'{name}_gbs']:.1f} GB/s, spread "
                    f"{100 * row[f'{name}_spread']:.0f}%)" for name in (*ACT_KERNELS, "bare_read"))
                    + f"; avx512_bf16 / bare read {row['avx512_bf16_vs_bare_read']:.2f}x (goal <= {BARE_READ_GOAL})",
                    flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help="token counts M (default: 1 8 32 128 512; with --activations 1 4)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per case (interleaved; medians)")
    parser.add_argument("--group-size", type=int, default=128, help="quantization group size")
    parser.add_argument("--skip-cpu", action="store_true", help="only the GPU part (when a GPU is present)")
    parser.add_argument("--ksplit", type=int, default=0,
                        help="GPU: K slices of the mma kernel (0: chosen from the SM count, as the runtime does)")
    parser.add_argument("--cache", choices=["decode", "cold", "warm"], default="decode",
                        help="CPU caches before each timed call: 'decode' evicts them, then primes the code on a twin "
                             "layer (this layer's data cold, as in a decode step); 'cold' evicts them, nothing primed "
                             "(code cold too); 'warm' evicts nothing (int4 weights of small layers then stay in L3, "
                             "dense ones do not)")
    parser.add_argument("--ring-mb", type=int, default=1024,
                        help="with --cache decode, M = 1 is also timed on rings of distinct layer copies of about this "
                             "many MB per kind, called back to back as a decode step calls its layers (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="wall time, or this thread's CPU time (robust on a shared machine; needs --threads 1)")
    parser.add_argument("--activations", action="store_true",
                        help="only the few-token activation comparison (vdpbf16ps / FMA vs VNNI exact parts vs one "
                             "int8 per element) on rings of weight copies, NVILA-Lite-2B shapes")
    parser.add_argument("--rounds", type=int, default=15, help="--activations: interleaved passes over each ring")
    parser.add_argument("--act-shapes", choices=sorted(ACT_SHAPE_SETS), default="2b",
                        help="--activations: the (N, K) set, NVILA-Lite-2B's (gate/up, down, qkv, o; default) or "
                             "NVILA-8B's")
    add_results_arg(parser)
    args = parser.parse_args(argv)
    if args.tokens is None:
        args.tokens = [1, 4] if args.activations else [1, 8, 32, 128, 512]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread":
        if torch.get_num_threads() != 1:
            parser.error("--clock thread measures one thread's CPU time: use it with --threads 1")
        CLOCK["fn"] = time.thread_time
    if args.activations:
        RING["mb"] = args.ring_mb or 512
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        print(f"CPU ({torch.get_num_threads()} threads): T16 kernels by activation handling, rings of "
              f"~{RING['mb']} MB of weight copies, {args.rounds} interleaved rounds")
        with torch.inference_mode():
            rows = bench_activations(args.tokens, args.rounds, args.group_size, ACT_SHAPE_SETS[args.act_shapes])
        names = [*ACT_KERNELS, "bare_read"]
        print(table(rows, ["N", "K", "M", *(f"{name}_gbs" for name in names), "avx512_bf16_vs_bare_read"]))
        print(table(rows, ["N", "K", "M", *(f"{name}_spread" for name in names)]))
        payload = {"group_size": args.group_size, "tokens": args.tokens, "threads": torch.get_num_threads(),
                   "rounds": args.rounds, "ring_mb": RING["mb"], "clock": args.clock,
                   "kernels": {k: v[0] for k, v in ACT_KERNELS.items()}, "bare_read_goal": BARE_READ_GOAL,
                   "load_average_start": load, "rows": rows, "shapes": args.act_shapes,
                   "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None}
        variant = "-".join(["activations"] + ([] if args.act_shapes == "2b" else [args.act_shapes])
                           + ([f"{args.threads}thread"] if args.threads else [])
                           + (["cputime"] if args.clock == "thread" else []))
        print(f"wrote {write_result('kernels', payload, variant, 'cpu', args.results)}")
        return
    if args.skip_cpu and not torch.cuda.is_available():
        print("--skip-cpu: no GPU here, nothing to measure (no results written)")
        return
    CACHE["mode"] = args.cache
    RING["mb"] = args.ring_mb
    if args.cache != "warm":
        # 128 MB read before every timed call; with the calls interleaved, several such reads and the other
        # functions' weights pass between two calls of one function, so its weights are out of cache even with a
        # larger L3 (the Emerald Rapids VM reports 300 MB)
        FLUSH["buf"] = torch.zeros(128 * 1024**2 // 4)
    torch.manual_seed(0)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    payload: dict = {"group_size": args.group_size, "tokens": args.tokens, "threads": torch.get_num_threads(),
                     "clock": args.clock, "cache": args.cache,
                     "caches_evicted_before_each_call": args.cache != "warm", "primed_on_twin": args.cache == "decode",
                     "ring_mb": args.ring_mb if args.cache == "decode" else 0, "load_average_start": load,
                     "native_cpu_helpers": native_available(), "cpu_dense_min_tokens": cpu_backend.DENSE_MIN_TOKENS}
    with torch.inference_mode():
        if not args.skip_cpu:
            print(f"CPU ({torch.get_num_threads()} threads): int4 'cpu' backend vs dense F.linear, same run")
            rows = bench_cpu(args.tokens, args.repeats, args.group_size)
            payload["cpu"] = {"rows": rows, "dequant_beats_int4_kernel_from_m": crossover(rows),
                              **check_cpu_goals(rows),
                              "amx": cpu_native.amx_active(), "amx_min_tokens": cpu_settings().amx_min_tokens,
                              "amx_gemm_min_tokens": cpu_settings().amx_gemm_min_tokens}
            cols = ["N", "K", "M", "path", "cpu_ms", "cpu_int4_kernel_ms", "cpu_t16_avx512_ms", "torch_int4_kernel_ms",
                    "cpu_dequant_dense_ms", "dense_bf16_ms", "dense_fp32_ms", "x_vs_bf16", "x_vs_fp32"]
            print(table(rows, cols))
            print("dequantize + dense beats the int4 kernel from M =",
                  payload["cpu"]["dequant_beats_int4_kernel_from_m"])
            print("goals met:", payload["cpu"]["met"])
            if payload["cpu"]["m1_all_cold_vs_fp32_min"] is not None:
                print(f"M=1 with nothing primed (all cold): min {payload['cpu']['m1_all_cold_vs_bf16_min']:.2f}x bf16, "
                      f"{payload['cpu']['m1_all_cold_vs_fp32_min']:.2f}x fp32")
            if payload["cpu"]["m1_ring_vs_fp32_min"] is not None:
                print(f"M=1 on rings of {RING['mb']} MB (back-to-back calls): "
                      f"min {payload['cpu']['m1_ring_vs_bf16_min']:.2f}x "
                      f"bf16, {payload['cpu']['m1_ring_vs_fp32_min']:.2f}x fp32; M=1 goals met there: "
                      f"{payload['cpu']['met_on_rings']}")
        if torch.cuda.is_available():
            cuda_settings().ksplit = args.ksplit
            payload["gpu"] = bench_gpu(args.tokens, args.repeats, args.group_size)
            payload["gpu"]["ksplit"] = args.ksplit or "auto"
            gpu = payload["gpu"]
            print(f"{gpu['device']}: copy bandwidth {gpu['copy_bandwidth_gbs']:.0f} GB/s; {gpu['timing']}")
            print(table(gpu["rows"], ["N", "K", "M", "cuda_ms", "cublas_fp16_ms", "x_vs_fp16", "bandwidth_fraction",
                                      "cuda_fused_gemm_ms", "cuda_rows_gemv_ms", "eager_cuda_ms",
                                      "eager_cublas_fp16_ms"]))
            def fmt(v: float | None) -> str:
                return "not measured (no such M)" if v is None else f"{v:.2f}"

            print(f"GEMV bandwidth fraction at M=1 (min) {fmt(gpu['gemv_bandwidth_fraction_m1_min'])}, GEMM vs cuBLAS "
                  f"at M>=512 (min) {fmt(gpu['gemm_vs_cublas_fp16_m512_min'])}; goals {GPU_GOALS}; met {gpu['met']}")
        else:
            payload["gpu"] = {"status": "not measured: no GPU", "goals": {k: "not measured: no GPU" for k in GPU_GOALS}}
    payload["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    variant = "-".join(([f"{args.threads}thread"] if args.threads else []) + (["cputime"] if args.clock == "thread"
                                                                                else []))
    path = write_result("kernels", payload, variant or None, "cuda" if torch.cuda.is_available() else "cpu",
                        args.results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
