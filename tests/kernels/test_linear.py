"""QuantLinear backends vs the reference oracle (CPU here; CUDA tests run where a GPU is present)."""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nvila_quant.errors import ConfigError
from nvila_quant.formats import QTensor
from nvila_quant.kernels.cpu import dispatch as cpu_backend
from nvila_quant.kernels.cpu import layout as cpu_layout
from nvila_quant.kernels.cpu import native as cpu_native
from nvila_quant.kernels.cpu.native import dequantize_nibbles, native_available
from nvila_quant.kernels.cpu.settings import CpuSettings, cpu_settings
from nvila_quant.kernels.linear import QuantLinear
from nvila_quant.numerics.nibbles import pack_nibbles, unpack_nibbles
from nvila_quant.numerics.quantizer import dequantize
from nvila_quant.settings import overrides

TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}
SHAPES = [  # (N, K, group): LLM-like, tiny projector, lite projector (576/192 fall back from 128)
    (128, 256, 128), (256, 768, 128), (256, 256, 64), (192, 576, 64), (256, 192, 64), (256, 576, -1),
    (64, 128, 32), (48, 384, 192), (32, 96, 32), (67, 1088, 64),  # N % 4 tail rows; 17 groups
]


def _layer(n: int, k: int, group: int, bias: bool, seed: int = 0, scale_dtype=torch.bfloat16) -> QTensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    return QTensor.from_float(w, 4, group, True, bias=b, scale_dtype=scale_dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_backend_matches_reference(n: int, k: int, group: int, dtype: torch.dtype,
                                       scale_dtype: torch.dtype) -> None:
    for bias in (True, False):
        qt = _layer(n, k, group, bias, seed=n + k, scale_dtype=scale_dtype)
        fast, ref = QuantLinear.from_qtensor(qt, "cpu"), QuantLinear.from_qtensor(qt, "reference")
        assert fast.resolve_backend(torch.device("cpu"), dtype) == "cpu"
        for lead in ((1,), (2,), (1, 3), (2, 7), (2, 13), (2, 33)):  # 1..66 tokens: every few-token kernel, dense
            x = torch.randn(*lead, k).to(dtype)  # fresh input per check, batched leading dims
            y = fast(x)
            assert y.shape == (*lead, n) and y.dtype == dtype
            assert _rel(y, ref(x)) < TOL[dtype], (n, k, group, dtype, bias, lead)


@pytest.mark.parametrize("kernel", ["native", "torch-int4"])
def test_cpu_few_token_kernels_and_dense_path(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both few-token kernels (native AVX-512, torch's int4 op) and the dense path match the oracle."""
    if kernel == "native" and not native_available():
        pytest.skip("native kernels did not build on this machine")
    if kernel == "torch-int4":
        monkeypatch.setattr(cpu_native, "native_caps", lambda: 0)  # no native library: torch's op only
    qt = _layer(128, 256, 128, True)
    fast, ref = QuantLinear.from_qtensor(qt, "cpu"), QuantLinear.from_qtensor(qt, "reference")
    picked = cpu_backend.few_token_kernel(128, 128, 256, torch.bfloat16)
    assert picked == ("native-bf16" if kernel == "native" else "torch-int4")
    for threshold in (1000, 1):  # all few-token kernel / all dense
        monkeypatch.setattr(cpu_settings(), "dense_min_tokens", threshold)
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(5, 256).to(dtype)
            assert _rel(fast(x), ref(x)) < 1e-2, (kernel, threshold, dtype)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    assert torch.equal(fast(x), ref(x))  # dense path: the same bf16 weights as the oracle
    if kernel == "torch-int4":  # torch's kernel is bf16-only: fp32 activations fall back to the oracle
        assert fast.resolve_backend(torch.device("cpu"), torch.float32) == "reference"


def test_dense_path_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many tokens: dequantize + matmul in cache-sized blocks of output rows (here 9 blocks, last one short)."""
    monkeypatch.setattr(cpu_backend, "CHUNK_ROWS", 32)  # 32 rows per block
    monkeypatch.setattr(cpu_settings(), "dense_min_tokens", 1)
    qt = _layer(272, 256, 64, True)
    fast, ref = QuantLinear.from_qtensor(qt, "cpu"), QuantLinear.from_qtensor(qt, "reference")
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(40, 256).to(dtype)
        assert _rel(fast(x), ref(x)) < TOL[dtype]
    monkeypatch.setattr(cpu_settings(), "chunk_mb", 0.0)  # one block
    x = torch.randn(40, 256, dtype=torch.bfloat16)
    assert torch.equal(fast(x), ref(x))
    monkeypatch.setattr(cpu_settings(), "chunk_mb", None)  # from CHUNK_MAX_TOKENS tokens: one block by default
    x = torch.randn(cpu_backend.CHUNK_MAX_TOKENS + 3, 256, dtype=torch.bfloat16)
    assert torch.equal(fast(x), ref(x))


def test_fallback_to_reference_logs_once(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers no CPU int4 kernel takes (group not a multiple of 32, odd K, 3-bit) run the oracle, logged once with the
    reason (the once-per-process cache emptied for each case, so each logs)."""
    from nvila_quant.kernels import linear

    cases = [(_layer(32, 96, 48, False), "group_size=48 is not a multiple of 32"),
             (_layer(16, 63, -1, True), "in_features=63 is odd"),
             (QTensor.from_float(torch.randn(32, 64), 3, 32, True, scale_dtype=torch.bfloat16), "bits=3")]
    for qt, reason in cases:
        monkeypatch.setattr(linear, "_LOGGED", set())
        fast, ref = QuantLinear.from_qtensor(qt, "cpu"), QuantLinear.from_qtensor(qt, "reference")
        with caplog.at_level(logging.WARNING, logger="nvila_quant.kernels.linear"):
            caplog.clear()
            for _ in range(3):
                x = torch.randn(3, qt.in_features, dtype=torch.bfloat16)
                assert torch.equal(fast(x), ref(x))
            assert fast.resolve_backend(torch.device("cpu"), torch.bfloat16) == "reference"
        logged = [r.message for r in caplog.records if "using 'reference'" in r.message]
        assert len(logged) == 1 and reason in logged[0], logged


def test_module_api_for_exporters() -> None:
    qt = _layer(64, 192, 64, True, scale_dtype=torch.float16)
    mod = QuantLinear.from_qtensor(qt)
    assert (mod.in_features, mod.out_features, mod.bits, mod.group_size) == (192, 64, 4, 64)
    assert mod.bias is not None and mod.qtensor().equal(qt)
    exact = dequantize(qt.q, qt.scale.float(), qt.zero, 64)  # fp32 (q - z) * s
    assert torch.equal(mod.dequantize_weight(torch.float32), exact)
    assert torch.equal(mod.dequantize_weight(torch.bfloat16), exact.bfloat16())
    assert "group_size=64" in repr(mod)
    with pytest.raises(ValueError, match="in_features=192"):
        mod(torch.randn(2, 100))


def test_from_linear_and_grad_through_input() -> None:
    lin = torch.nn.Linear(256, 64)
    mod = QuantLinear.from_linear(lin, group_size=64, backend="cpu")
    x = torch.randn(20, 256, requires_grad=True)
    y = mod(x)
    y.sum().backward()
    w = mod.dequantize_weight(torch.float32)
    assert torch.allclose(x.grad, w.sum(0).expand_as(x), atol=1e-5)
    with torch.no_grad():
        assert _rel(y, F.linear(x, lin.weight, lin.bias)) < 0.1  # 4-bit RTN error only


def test_native_kernels_build_where_the_cpu_has_avx512() -> None:
    """A compile error must not hide behind the torch fallback: on an AVX-512 BF16 CPU the native library loads."""
    from nvila_quant.kernels.cpu.native import CAP_AMX, CAP_BF16, CAP_F32, CAP_T16_F32, CAP_VNNI, native_caps

    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    if not {"avx512f", "avx512bw", "avx512_bf16"} <= flags:
        pytest.skip("this CPU has no AVX-512 BF16")
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc) on PATH")
    amx = CAP_AMX if {"amx_tile", "amx_bf16"} <= flags else 0
    vnni = CAP_VNNI if "avx512_vnni" in flags else 0
    assert native_caps() == CAP_F32 | CAP_BF16 | CAP_T16_F32 | amx | vnni


def _t16_call(fn, layer: QuantLinear, x: torch.Tensor, threads: int = 2) -> torch.Tensor:  # noqa: ANN001 (ctypes)
    """One of the native T16 kernels called directly on a CPU-prepared layer (output in x's dtype, NaN-poisoned)."""
    state = layer.kernel_state("cpu")
    m, k = x.shape
    n = layer.q.shape[0]
    out = torch.full((m, n), float("nan"), dtype=x.dtype)
    rc = fn(x.data_ptr(), layer.q.data_ptr(), state.scale.data_ptr(), state.zero.data_ptr(),
            None if state.bias is None else state.bias.data_ptr(), out.data_ptr(), m, n, k, state.group, threads,
            cpu_native.SCALE_KINDS[state.scale.dtype])
    assert rc == 0, (fn, m, n, k)
    return out.float()


def test_amx_t16_kernels_match_the_avx512_one() -> None:
    """On AMX CPUs the bf16 T16 kernel runs on tiles from a few tokens, and as a tiled GEMM on bf16-rounded weights
    from more: token tails of every 16-token block, 64-token pass and 512-token work item, K blocks with a tail,
    weight-row blocks with an odd unit, group sizes (one straddling a K block), scale dtypes and bias, against the
    AVX-512 kernel and the oracle (NaN-poisoned)."""
    if not cpu_native.amx_active():
        pytest.skip("no AMX tiles here (or the OS refused AMX state)")
    rng = torch.Generator().manual_seed(7)
    cases = [(16, 64, 64, 2), (32, 128, 128, 15), (48, 256, 64, 16), (64, 256, 256, 17), (32, 192, 64, 33),
             (16, 128, 128, 64), (32, 128, 64, 65), (48, 128, 128, 130), (272, 640, 64, 47), (48, 768, 192, 530)]
    lib = cpu_native.library()
    kernels = {"amx": lib.nq_t16_bf16_amx, "gemm": lib.nq_t16_bf16_amx_gemm, "avx512": lib.nq_t16_bf16}
    for i, (n, k, group, m) in enumerate(cases):
        scale_dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
        qt = QTensor.from_float(torch.randn(n, k, generator=rng), 4, group, True,
                                bias=torch.randn(n, generator=rng) if i % 2 else None, scale_dtype=scale_dtype)
        fast, ref = QuantLinear.from_qtensor(qt, "cpu"), QuantLinear.from_qtensor(qt, "reference")
        fast.prepare("cpu", torch.bfloat16)
        assert fast.q_layout == "t16"
        x = torch.randn(m, k, generator=rng).to(torch.bfloat16)
        outs = {}
        for name, fn in kernels.items():
            with cpu_native.avx512_bf16_only() if name == "avx512" else contextlib.nullcontext():
                outs[name] = _t16_call(fn, fast, x)
            assert not outs[name].isnan().any(), (name, n, k, group, m)
        expect = ref(x).float()
        for name in ("amx", "gemm"):
            assert _rel(outs[name], outs["avx512"]) < 1e-2, (name, n, k, group, m)
            assert _rel(outs[name], expect) < 1e-2, (name, n, k, group, m)
        # many threads split the work finer (smaller GEMM items), with the same sums in the same order
        assert torch.equal(_t16_call(lib.nq_t16_bf16_amx_gemm, fast, x, threads=24), outs["gemm"])
        # the GEMM multiplies the dense path's bf16 weights: it matches that product up to the bf16 output
        dense = F.linear(x.float(), ref.dequantize_weight(torch.bfloat16).float(),
                         None if ref.bias is None else ref.bias.float())
        assert _rel(outs["gemm"], dense) < 5e-3, (n, k, group, m)
        assert _rel(fast(x), expect) < 1e-2  # the module path (AMX from AMX_MIN_TOKENS tokens)


def test_vnni_t16_kernels_match_the_avx512_ones() -> None:
    """The VNNI T16 kernels for few tokens (x as int8 parts: two for bf16, four for fp32): token counts through every
    pass shape, single-unit tails, group sizes, scale dtypes, bias and activations with 1000x outlier channels agree
    with the vdpbf16ps / FMA kernels and the oracle (bf16: to the output's rounding; fp32 with two parts: within 1e-6
    of an fp64 product); a NaN or infinity in x gives non-finite outputs as in the reference, zeros zeros; the
    dispatchers take them up to their thresholds."""
    if not cpu_native.native_caps() & cpu_native.CAP_VNNI or not cpu_native.native_caps() & cpu_native.CAP_BF16:
        pytest.skip("no AVX-512 VNNI + BF16 here")
    rng = torch.Generator().manual_seed(11)
    lib = cpu_native.library()
    cases = [(16, 64, 64, 1), (144, 256, 128, 1), (80, 128, 128, 2), (64, 256, 64, 3), (48, 192, 192, 4),
             (96, 256, 256, 5), (64, 512, 128, 7)]
    for i, (n, k, group, m) in enumerate(cases):
        fast, ref, x = _t16_case(rng, i, n, k, group, m)
        got = _t16_call(lib.nq_t16_bf16_vnni, fast, x)
        assert torch.equal(_t16_call(lib.nq_t16_bf16_vnni, fast, x, threads=24), got)  # blocks of 1 unit, same sums
        with cpu_native.avx512_bf16_only():
            bf16 = _t16_call(lib.nq_t16_bf16, fast, x)
            fma32 = _t16_call(lib.nq_t16_f32, fast, x.float())
        expect = F.linear(x.float(), ref.dequantize_weight(torch.float32),
                          None if ref.bias is None else ref.bias.float())
        assert not got.isnan().any()
        assert _rel(got, expect) < 4e-3 and _rel(got, bf16) < 6e-3, (n, k, group, m)
        assert _rel(fast(x), ref(x)) < 1e-2
        # fp32 activations: two 15-bit parts, as close to the exact product as the exact-weight FMA kernel
        expect64 = F.linear(x.double(), ref.dequantize_weight(torch.float64),
                            None if ref.bias is None else ref.bias.double())
        got32 = _t16_call(lib.nq_t16_f32_vnni, fast, x.float())
        assert _rel(got32, expect64) < 1e-6 and _rel(fma32, expect64) < 1e-5, (n, k, group, m)
        assert _rel(fast(x.float()), ref(x.float())) < 1e-5
    special = torch.ones(3, k).bfloat16()
    special[0, 3], special[1, k - 1], special[2] = float("nan"), float("inf"), 0.0
    bias = fast.kernel_state("cpu").bias
    for fn, xs in ((lib.nq_t16_bf16_vnni, special), (lib.nq_t16_f32_vnni, special.float())):
        out = _t16_call(fn, fast, xs)
        assert not out[:2].isfinite().any() and (out[2] == (0 if bias is None else bias.to(xs.dtype).float())).all()
    with overrides(cpu_settings(), vnni_max_tokens=8, vnni_f32_max_tokens=8):
        # the dispatchers: nq_t16_bf16 / nq_t16_f32 take it up to their thresholds
        x = torch.randn(8, k, generator=rng).bfloat16()
        assert torch.equal(_t16_call(lib.nq_t16_bf16, fast, x), _t16_call(lib.nq_t16_bf16_vnni, fast, x))
        assert torch.equal(_t16_call(lib.nq_t16_f32, fast, x.float()), _t16_call(lib.nq_t16_f32_vnni, fast, x.float()))


def _t16_case(rng: torch.Generator, i: int, n: int, k: int, group: int,
              m: int) -> tuple[QuantLinear, QuantLinear, torch.Tensor]:
    """Case i of the VNNI tests: a random layer (bias on odd cases, the scale dtype cycling fp32 / bf16 / fp16) as the
    CPU backend prepared for bf16 x (T16) and as the reference, and bf16 x (m, k) with 1000x outlier channels."""
    qt = QTensor.from_float(torch.randn(n, k, generator=rng), 4, group, True,
                            bias=torch.randn(n, generator=rng) if i % 2 else None,
                            scale_dtype=(torch.float32, torch.bfloat16, torch.float16)[i % 3])
    fast, ref = QuantLinear.from_qtensor(qt, "cpu"), QuantLinear.from_qtensor(qt, "reference")
    fast.prepare("cpu", torch.bfloat16)
    outlier = torch.where(torch.rand(k, generator=rng) < 0.02, 1000.0, 1.0)
    return fast, ref, (torch.randn(m, k, generator=rng) * outlier).to(torch.bfloat16)


def _int8_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) as the int8 activation mode quantizes it, in fp64: per 64-wide chunk xs = max|x| / 127 and xq = x *
    (127 / max|x|) rounded to fp32, then to the nearest integer (ties to even), each fp32 operation rounded once as
    the kernel's are; and the chunks' max|x| (M, K/64)."""
    m, k = x.shape
    xb = x.double().view(m, k // 64, 64)
    mx = xb.abs().amax(-1, keepdim=True)
    inv = (127.0 / mx).float().double()  # (fp64 then fp32: the correctly rounded fp32 quotient / product)
    xs = (mx / 127.0).float().double()
    xq = torch.round((xb * inv).float().double())
    return torch.where(mx > 0, xq * xs, 0.0).view(m, k), mx.view(m, k // 64)


def test_vnni_int8_activations_within_the_derived_bound() -> None:
    """The one-part int8 mode (NVILA_QUANT_CPU_ACTIVATIONS=int8; nq_t16_bf16_vnni8 / nq_t16_f32_vnni8): x per 64-wide
    chunk as one int8 with scale max|x| / 127. With fp32 output it is the product of those int8 activations to fp32
    accuracy (which pins the quantization: blocks of 32 or another rounding would differ by ~1e-3); against the
    reference (exact x, fp32 weights) each output stays within the bound the rounding allows - an element is off by at
    most half a step, max|x_c| / 254 of its chunk c, so |y_n - ref_n| <= sum_c max|x_c| / 254 * sum_{k in c} |W_nk| -
    plus the output's rounding (bf16: 2^-8 relative) and fp32 sums; token counts through every pass shape, tails,
    group sizes, scale dtypes, bias, 1000x outlier channels; NaN / infinity / zeros as the exact kernels."""
    if not cpu_native.native_caps() & cpu_native.CAP_VNNI or not cpu_native.native_caps() & cpu_native.CAP_BF16:
        pytest.skip("no AVX-512 VNNI + BF16 here")
    rng = torch.Generator().manual_seed(13)
    lib = cpu_native.library()
    # single units with 1-4 tokens (and 4 + 1); blocks of 8 units for 1 token (with 2 threads), of 4 units for 1-4
    # tokens at a time (7 = 4 + 3)
    cases = [(16, 64, 64, 1), (144, 256, 128, 1), (80, 128, 128, 2), (64, 256, 64, 3), (48, 192, 192, 4),
             (96, 256, 256, 5), (1024, 128, 128, 1), (256, 512, 128, 1), (272, 256, 64, 2), (256, 192, 192, 3),
             (256, 512, 64, 4), (320, 256, 128, 7)]
    for i, (n, k, group, m) in enumerate(cases):
        fast, ref, x = _t16_case(rng, i, n, k, group, m)
        w = ref.dequantize_weight(torch.float64)
        b = None if ref.bias is None else ref.bias.double()
        x8, mx = _int8_x(x)
        expect = F.linear(x.double(), w, b)
        bound = (mx / 254) @ w.abs().view(n, k // 64, 64).sum(-1).t()  # (M, N): sum_c max|x_c| / 254 sum |W|
        sums = x.double().abs() @ w.abs().t()  # scale of the fp32 accumulation errors
        got = _t16_call(lib.nq_t16_bf16_vnni8, fast, x)
        got32 = _t16_call(lib.nq_t16_f32_vnni8, fast, x.float())
        assert torch.equal(_t16_call(lib.nq_t16_bf16_vnni8, fast, x, threads=24), got)  # blocks of 1 unit
        assert _rel(got32, F.linear(x8, w, b)) < 1e-6, (n, k, group, m)
        assert (got.double() - expect).abs().le(bound + got.double().abs() * 2**-8 + 1e-5 * sums).all(), (n, k, m)
        assert (got32.double() - expect).abs().le(bound + 1e-5 * sums).all(), (n, k, group, m)
        assert _rel(got32, expect) > 1e-4  # (not the exact kernels' accuracy: the mode is taken)
    special = torch.ones(3, k).bfloat16()
    special[0, 3], special[1, k - 1], special[2] = float("nan"), float("inf"), 0.0
    bias = fast.kernel_state("cpu").bias
    for fn, xs in ((lib.nq_t16_bf16_vnni8, special), (lib.nq_t16_f32_vnni8, special.float())):
        out = _t16_call(fn, fast, xs)
        assert not out[:2].isfinite().any() and (out[2] == (0 if bias is None else bias.to(xs.dtype).float())).all()


def test_int8_activations_setting_routes_few_tokens_to_the_one_part_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVILA_QUANT_CPU_ACTIVATIONS=int8 sends bf16 and fp32 calls of up to NVILA_QUANT_CPU_INT8_MAX_TOKENS tokens to
    the one-part kernel (the dispatchers and the module path, bit-identical to it; t16_route says "vnni-int8x1"), more
    tokens keep their exact kernel; the default is exact, and leaving the setting restores the exact routes."""
    if not cpu_native.native_caps() & cpu_native.CAP_VNNI or not cpu_native.native_caps() & cpu_native.CAP_BF16:
        pytest.skip("no AVX-512 VNNI + BF16 here")
    monkeypatch.delenv("NVILA_QUANT_CPU_ACTIVATIONS", raising=False)
    monkeypatch.delenv("NVILA_QUANT_CPU_INT8_MAX_TOKENS", raising=False)
    assert CpuSettings.from_env().activations == "exact"
    assert cpu_native.int8_max_tokens(CpuSettings.from_env()) == (0, 0)
    monkeypatch.setenv("NVILA_QUANT_CPU_ACTIVATIONS", "int8")
    assert cpu_native.int8_max_tokens(CpuSettings.from_env()) == cpu_native.INT8_MAX_TOKENS == (2, 64)
    monkeypatch.setenv("NVILA_QUANT_CPU_INT8_MAX_TOKENS", "16")
    assert cpu_native.int8_max_tokens(CpuSettings.from_env()) == (16, 16)
    monkeypatch.setenv("NVILA_QUANT_CPU_ACTIVATIONS", "int4")
    with pytest.raises(ConfigError, match="NVILA_QUANT_CPU_ACTIVATIONS must be one of exact, int8, got 'int4'"):
        CpuSettings.from_env()
    lib = cpu_native.library()
    qt = _layer(128, 256, 64, True)
    fast = QuantLinear.from_qtensor(qt, "cpu")
    fast.prepare("cpu", torch.bfloat16)
    rng = torch.Generator().manual_seed(3)
    xs = {m: torch.randn(m, 256, generator=rng).bfloat16() for m in (1, 3, 4)}
    with overrides(cpu_settings(), activations="exact"):
        routes = {(dt, m): cpu_native.t16_route(dt, m) for dt in (torch.bfloat16, torch.float32) for m in xs}
        exact = {m: (_t16_call(lib.nq_t16_bf16, fast, x), _t16_call(lib.nq_t16_f32, fast, x.float()), fast(x))
                 for m, x in xs.items()}
    assert "vnni-int8x1" not in routes.values()
    with overrides(cpu_settings(), activations="int8", int8_max_tokens=3):
        for m, x in xs.items():
            one_part = m <= 3
            for dt in (torch.bfloat16, torch.float32):
                assert cpu_native.t16_route(dt, m) == ("vnni-int8x1" if one_part else routes[dt, m]), (dt, m)
            bf16, f32 = _t16_call(lib.nq_t16_bf16, fast, x), _t16_call(lib.nq_t16_f32, fast, x.float())
            if one_part:
                assert torch.equal(bf16, _t16_call(lib.nq_t16_bf16_vnni8, fast, x)), m
                assert torch.equal(f32, _t16_call(lib.nq_t16_f32_vnni8, fast, x.float())), m
                assert torch.equal(fast(x).float(), bf16), m  # the module path (bound layer) too
            else:
                assert torch.equal(bf16, exact[m][0]) and torch.equal(f32, exact[m][1]), m
    with overrides(cpu_settings(), activations="exact"):  # re-applied when the setting changes back
        assert {(dt, m): cpu_native.t16_route(dt, m) for dt, m in routes} == routes
        assert all(torch.equal(fast(x), exact[m][2]) for m, x in xs.items())


def test_vnni_kernel_without_vbmi_permutes_words_to_the_same_sums() -> None:
    """CPUs with AVX-512 VNNI + BF16 but no VBMI (Cooper Lake) pair the T16 rows with vpermw instead of vpermb: the
    library built for them gives bit-identical outputs here (bf16 and fp32 activations)."""
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    if not cpu_native.native_caps() & cpu_native.CAP_VNNI or "avx512vbmi" not in flags:
        pytest.skip("needs AVX-512 VNNI, BF16 and VBMI here")
    lib = cpu_native.load_library("cooperlake")
    assert lib.nq_caps() & cpu_native.CAP_VNNI and not lib.nq_caps() & cpu_native.CAP_AMX
    rng = torch.Generator().manual_seed(5)
    for n, k, group, m in ((144, 256, 128, 1), (64, 512, 64, 2), (80, 192, 192, 5)):
        fast = QuantLinear.from_qtensor(QTensor.from_float(torch.randn(n, k, generator=rng), 4, group, True), "cpu")
        fast.prepare("cpu", torch.bfloat16)
        x = torch.randn(m, k, generator=rng).bfloat16()
        for name, xs in (("nq_t16_bf16_vnni", x), ("nq_t16_f32_vnni", x.float()), ("nq_t16_bf16_vnni8", x),
                         ("nq_t16_f32_vnni8", x.float())):
            native = _t16_call(getattr(cpu_native.library(), name), fast, xs)
            assert torch.equal(_t16_call(getattr(lib, name), fast, xs), native), (name, n, k, group, m)


def test_vnni_without_bf16_serves_fp32_and_bf16_activations(monkeypatch: pytest.MonkeyPatch) -> None:
    """AVX-512 VNNI CPUs without BF16 (Cascade Lake, Ice Lake; here: the library built for cascadelake) have the
    integer kernel for fp32 x, which also serves their bf16 activations (converted for the fp32 T16 kernel): up to
    the fp32 VNNI threshold the dispatcher takes it, bit-identical to this CPU's fp32 VNNI kernel."""
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    if not {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags or shutil.which("cc") is None:
        pytest.skip("needs AVX-512 VNNI and a C compiler")
    native = cpu_native.library()
    lib = cpu_native.load_library("cascadelake")
    caps = lib.nq_caps()
    assert caps & cpu_native.CAP_VNNI and caps & cpu_native.CAP_T16_F32 and not caps & cpu_native.CAP_BF16
    lib.nq_set_vnni_max_tokens(2, 1)
    monkeypatch.setattr(cpu_native, "library", lambda: lib)
    monkeypatch.setattr(cpu_native, "native_caps", lambda: int(lib.nq_caps()))
    qt = _layer(128, 256, 64, True, scale_dtype=torch.bfloat16)
    fast, ref = QuantLinear.from_qtensor(qt, "cpu"), QuantLinear.from_qtensor(qt, "reference")
    for m in (1, 2, 5):
        x = torch.randn(m, 256, dtype=torch.bfloat16)
        assert _rel(fast(x), ref(x)) < 1e-2 and fast.q_layout == "t16", m
        assert cpu_native.t16_route(torch.bfloat16, m) == ("vnni-int8x4" if m <= 2 else "avx512-fma")
        got = _t16_call(lib.nq_t16_f32, fast, x.float())
        if m <= 2:
            assert torch.equal(got, _t16_call(native.nq_t16_f32_vnni, fast, x.float())), m
        assert _rel(got, ref(x.float())) < 1e-5, m
    state, x, out = (fast.kernel_state("cpu"), torch.randn(1, 256, dtype=torch.bfloat16),
                     torch.empty(1, 128, dtype=torch.bfloat16))
    for fn in (lib.nq_t16_bf16_vnni, lib.nq_t16_bf16_vnni8):
        rc = fn(x.data_ptr(), fast.q.data_ptr(), state.scale.data_ptr(), state.zero.data_ptr(), None, out.data_ptr(), 1,
                128, 256, 64, 2, cpu_native.SCALE_KINDS[state.scale.dtype])
        assert rc == -2  # the bf16 ones are not compiled without BF16
    # the one-part int8 mode for fp32 x (and so for these CPUs' bf16 activations): the same sums as here
    x4 = torch.randn(4, 256, dtype=torch.bfloat16).float()
    assert torch.equal(_t16_call(lib.nq_t16_f32_vnni8, fast, x4), _t16_call(native.nq_t16_f32_vnni8, fast, x4))


def test_vnni_threshold_covers_the_tokens_amx_would_take_when_the_os_refuses_it(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an AMX-class CPU whose OS refuses AMX the bf16 VNNI kernel takes every count below the dense path (it
    beats the vdpbf16ps kernel those tokens would fall to); with AMX granted, on other CPUs, or with the variable
    set: unchanged."""
    monkeypatch.delenv("NVILA_QUANT_CPU_VNNI_MAX_TOKENS", raising=False)
    monkeypatch.setattr(cpu_native, "AMX_CPU", True)
    assert cpu_native.vnni_thresholds(CpuSettings.from_env(), amx_granted=False)[0] == 64
    assert cpu_native.vnni_thresholds(CpuSettings.from_env(), amx_granted=True)[0] == 4
    monkeypatch.setenv("NVILA_QUANT_CPU_VNNI_MAX_TOKENS", "3")
    assert cpu_native.vnni_thresholds(CpuSettings.from_env(), amx_granted=False)[0] == 3
    monkeypatch.setattr(cpu_native, "AMX_CPU", False)
    monkeypatch.delenv("NVILA_QUANT_CPU_VNNI_MAX_TOKENS")
    assert cpu_native.vnni_thresholds(CpuSettings.from_env(), amx_granted=False)[0] == 0
    assert cpu_native.default_vnni_max_tokens(amx_cpu=False, amx_granted=True) == 0


def test_t16_route_follows_the_thresholds() -> None:
    """t16_route names the kernel the dispatchers pick, and follows the threshold setters."""
    if cpu_native.t16_kernel(torch.bfloat16) != "bf16":
        pytest.skip("no bf16 T16 kernel here")
    with cpu_native.avx512_bf16_only():
        assert cpu_native.t16_route(torch.bfloat16, 1) == cpu_native.t16_route(torch.bfloat16, 512) == "avx512-bf16"
        assert cpu_native.t16_route(torch.float32, 1) == "avx512-fma"
    if cpu_native.native_caps() & cpu_native.CAP_VNNI:
        with overrides(cpu_settings(), vnni_max_tokens=3):
            assert cpu_native.t16_route(torch.bfloat16, 3) == "vnni-int8x2"
    settings = cpu_settings()
    gemm_from = settings.amx_gemm_min_tokens
    vnni_max = cpu_native.vnni_thresholds(settings, amx_granted=True)[0]
    if cpu_native.amx_active() and gemm_from - 1 >= max(settings.amx_min_tokens, vnni_max + 1):
        assert cpu_native.t16_route(torch.bfloat16, gemm_from) == "amx-gemm"
        assert cpu_native.t16_route(torch.bfloat16, gemm_from - 1) == "amx-tiles"


def test_native_dequantize_bit_exact() -> None:
    if not native_available():
        pytest.skip("no C compiler: the torch fallback is used")
    n, k, g = 48, 512, 128
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    z = torch.randint(0, 16, (n, k // g), dtype=torch.uint8)
    for scale_dtype in (torch.float32, torch.bfloat16, torch.float16):  # scales are read as the checkpoint stores them
        s = (torch.rand(n, k // g) * 0.05).to(scale_dtype)
        exact = dequantize(q, s.float(), z, g)
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(dequantize_nibbles(pack_nibbles(q), s, z, g, dtype),
                               exact.to(dtype)), (scale_dtype, dtype)


def test_cpu_prepare_repeats_groups_exactly() -> None:
    """A per-channel (or 192-wide) group runs as repeated 64-wide kernel groups: same numbers."""
    assert cpu_backend.kernel_group(-1, 576) == 64 and cpu_backend.kernel_group(192, 576) == 64
    assert cpu_backend.kernel_group(48, 96) is None
    assert cpu_backend.cpu_support(4, 48, 32, 96) == "group_size=48 is not a multiple of 32"
    assert cpu_backend.cpu_support(3, 32, 32, 96) == "bits=3 (the int4 kernels need 4)"


def test_cpu_backend_under_torch_compile() -> None:
    """Dynamo traces QuantLinear (its __call__ shortcut and forward's eager path are skipped): the CPU kernels run as
    the registered op or a graph break, also after eager calls bound a kernel to the layer."""
    qt = _layer(128, 256, 64, True)
    mod = QuantLinear.from_qtensor(qt, "cpu")
    compiled = torch.compile(mod, backend="aot_eager")
    for m in (1, 5):
        x = torch.randn(m, 256, dtype=torch.bfloat16)
        assert torch.equal(compiled(x), mod(x)), m
    warm = QuantLinear.from_qtensor(qt, "cpu")
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    eager = warm(x)
    assert torch.equal(torch.compile(warm, backend="aot_eager")(x), eager)


def test_call_shortcut_keeps_hooks_and_errors() -> None:
    """QuantLinear.__call__ goes straight to the bound kernel only without hooks and with its own forward: module and
    global forward hooks still fire (and may change inputs and outputs), a forward replaced on the instance runs, and a
    wrong width still gives the clear error."""
    qt = _layer(128, 256, 64, True)
    mod = QuantLinear.from_qtensor(qt, "cpu")
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    plain = mod(x)
    assert torch.equal(mod(x), plain)
    seen: list[str] = []
    pre = mod.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    post = mod.register_forward_hook(lambda module, args, out: seen.append("module") or out + 1)
    assert torch.equal(mod(x), mod.forward(x * 2) + 1) and seen
    pre.remove()
    post.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append("global"))
    try:
        assert torch.equal(mod(x), plain) and seen[-1] == "global"
    finally:
        handle.remove()
    original = mod.forward
    mod.forward = lambda inp: original(inp) * 0  # a forward replaced on the instance (as accelerate's hooks do)
    assert not mod(x).any()
    del mod.forward
    assert torch.equal(mod(x=x), plain)
    with pytest.raises(ValueError, match="in_features=256"):
        mod(torch.randn(1, 255, dtype=torch.bfloat16))
    x3 = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    assert torch.equal(mod(x3), mod.forward(x3)) and mod(x3).shape == (2, 3, 128)
    param = torch.nn.Parameter(x.clone(), requires_grad=False)  # a tensor subclass: the normal path, same numbers
    assert torch.equal(mod(param), plain)


def test_t16_layout_follows_the_activations_and_stays_invisible() -> None:
    """bf16 calls repack q into the T16 layout; fp32 calls, state dicts, qtensor() and device moves see nibble rows."""
    if not native_available() or not cpu_backend.t16_wanted(4, 128, 256, 64, torch.bfloat16):
        pytest.skip("native bf16 kernels did not build on this machine")
    qt = _layer(128, 256, 64, True)
    fast, ref = QuantLinear.from_qtensor(qt, "cpu"), QuantLinear.from_qtensor(qt, "reference")
    rows = fast.q.clone()
    for m in (1, 4, 9, 70, 300):  # every token count runs the T16 kernel
        x = torch.randn(m, 256, dtype=torch.bfloat16)
        assert _rel(fast(x), ref(x)) < 1e-2, m
    assert fast.q_layout == "t16" and not torch.equal(fast.q, rows)
    assert torch.equal(fast.state_dict()["q"], rows) and fast.qtensor().equal(qt)
    assert torch.equal(fast.dequantize_weight(torch.float32), ref.dequantize_weight(torch.float32))
    with overrides(cpu_settings(), dense_min_tokens=1):  # the dense path dequantizes T16 blocks
        x = torch.randn(5, 256, dtype=torch.bfloat16)
        assert torch.equal(fast(x), ref(x))
    with overrides(cpu_settings(), kernel="torch"):  # torch's int4 op, repacked from the T16 bytes
        x = torch.randn(5, 256, dtype=torch.bfloat16)
        assert _rel(fast(x), ref(x)) < 1e-2 and fast.q_layout == "t16"
    x = torch.randn(3, 256, requires_grad=True, dtype=torch.bfloat16)  # autograd: a dequantized weight
    fast(x).float().sum().backward()
    assert x.grad is not None and fast.q_layout == "t16"
    copy = QuantLinear.from_qtensor(qt, "cpu")
    copy(torch.randn(1, 256, dtype=torch.bfloat16))
    copy.load_state_dict(fast.state_dict())  # rows in, layout reset, repacked on the next call
    assert copy.q_layout == "rows" and torch.equal(copy.q, rows)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    assert torch.equal(copy(x), fast(x))
    for m in (1, 3, 70):  # fp32 activations: the fp32 T16 kernel (exact fp32 weights)
        x32 = torch.randn(m, 256)
        assert _rel(fast(x32), ref(x32)) < TOL[torch.float32] and fast.q_layout == "t16", m
    copy.float()  # casts and moves see rows
    assert copy.q_layout == "rows" and torch.equal(copy.q, rows)


def test_t16_without_bf16_and_without_t16_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """An AVX-512 CPU without BF16 runs bf16 activations on the fp32 T16 kernel; activations no T16 kernel takes
    send T16 weights back to nibble rows for good."""
    if not native_available() or not cpu_native.native_caps() & cpu_native.CAP_T16_F32:
        pytest.skip("native T16 kernels did not build on this machine")
    qt = _layer(128, 256, 64, True)
    ref = QuantLinear.from_qtensor(qt, "reference")
    monkeypatch.setattr(cpu_native, "native_caps", lambda: cpu_native.CAP_F32 | cpu_native.CAP_T16_F32)
    fast = QuantLinear.from_qtensor(qt, "cpu")
    for m in (1, 9):
        x = torch.randn(m, 256, dtype=torch.bfloat16)
        assert _rel(fast(x), ref(x)) < 1e-2 and fast.q_layout == "t16", m
    assert fast.kernel_state("cpu").plan(fast.q, torch.bfloat16).kernel == "native-t16-f32"
    monkeypatch.setattr(cpu_backend, "t16_wanted", lambda bits, n, k, g, dtype: dtype != torch.float32)
    x32 = torch.randn(3, 256)
    assert _rel(fast(x32), ref(x32)) < TOL[torch.float32] and fast.q_layout == "rows"
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    assert _rel(fast(x), ref(x)) < 1e-2 and fast.q_layout == "rows"


def test_t16_pack_roundtrip() -> None:
    if not native_available():
        pytest.skip("native kernels did not build on this machine")
    from nvila_quant.kernels.cpu.layout import t16_pack, t16_unpack

    q = torch.randint(0, 256, (48, 96), dtype=torch.uint8)  # N = 48, K = 192
    packed = t16_pack(q)
    assert packed.shape == q.shape and torch.equal(t16_unpack(packed), q)
    assert torch.equal(t16_unpack(packed[16:32]), q[16:32])  # whole 16-row units unpack on their own
    # byte b of unit u in chunk c holds rows 16 * block + b // 2, columns 64 c + 2 u + b % 2 (low) and + 32 (high)
    nib = unpack_nibbles(q)
    assert int(packed.view(-1)[(1 * 16 + 3) * 32 + 5]) == int(nib[2, 64 + 6 + 1] | nib[2, 64 + 32 + 6 + 1] << 4)
    with pytest.raises(ValueError, match="N % 16"):
        t16_pack(q[:40])


def _smaps_field(address: int, field: str) -> int:
    """``field`` of the /proc/self/smaps entry of the map holding ``address``."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(v, 16) for v in head.split("-"))
            if lo <= address < hi:
                for entry in lines[i + 1:]:
                    if entry.startswith(field + ":"):
                        return int(entry.split()[1])
    raise AssertionError(f"{field} of {address:#x} not in /proc/self/smaps")


def test_t16_weights_on_huge_pages() -> None:
    """T16 weights of 2 MB or more get a private map of their own, 2 MB aligned and advised for transparent huge
    pages (Linux); the layer computes, copies, pickles and reloads like any other."""
    import copy
    import io
    import mmap

    if not native_available():
        pytest.skip("native kernels did not build on this machine")
    assert cpu_layout.empty_huge_pages(4096).numel() == 4096  # small: torch.empty
    big = cpu_layout.empty_huge_pages(5 * cpu_layout.HUGE_PAGE + 4096)
    assert big.dtype == torch.uint8 and big.numel() == 5 * cpu_layout.HUGE_PAGE + 4096
    linux = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS") and Path("/proc/self/smaps").exists()
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if linux:
        assert big.data_ptr() % cpu_layout.HUGE_PAGE == 0
        if thp.exists() and "[never]" not in thp.read_text():  # (huge pages themselves depend on free memory)
            assert _smaps_field(big.data_ptr(), "THPeligible") == 1
    big.fill_(7)
    del big

    qt = _layer(2560, 2048, 128, True)  # 2.5 MB of nibbles
    mod = QuantLinear.from_qtensor(qt, "cpu")
    x = torch.randn(3, 2048, dtype=torch.bfloat16)
    y = mod(x)
    assert _rel(y, QuantLinear.from_qtensor(qt, "reference")(x)) < TOL[torch.bfloat16]
    if mod.q_layout == "t16" and linux:
        assert mod.q.data_ptr() % cpu_layout.HUGE_PAGE == 0
    clone = copy.deepcopy(mod)
    assert torch.equal(clone(x), y) and clone.qtensor().equal(qt)
    buf = io.BytesIO()
    torch.save(mod.state_dict(), buf)
    del mod, clone  # the maps go with their tensors
    buf.seek(0)
    fresh = QuantLinear.from_qtensor(_layer(2560, 2048, 128, True, seed=1), "cpu")
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), y)


def test_used_layers_copy_and_pickle() -> None:
    """deepcopy / torch.save of a layer that has run (native kernels bound, maybe T16 weights) keep its weights."""
    import copy
    import io

    qt = _layer(128, 256, 64, True)
    mod = QuantLinear.from_qtensor(qt, "cpu")
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    y = mod(x)
    clone = copy.deepcopy(mod)
    assert clone.q_layout == "rows" and torch.equal(clone(x), y) and clone.qtensor().equal(qt)
    buf = io.BytesIO()
    torch.save(mod.state_dict(), buf)
    buf.seek(0)
    fresh = QuantLinear.from_qtensor(_layer(128, 256, 64, True, seed=1), "cpu")
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), y)


def test_t16_dequantize_t_is_bit_exact() -> None:
    """W^T straight from the T16 layout equals the layer's dequantized weight (fp32 and bf16), for any 16-row block,
    group sizes and scale dtypes; the dense path with it matches the oracle."""
    if cpu_native.t16_kernel(torch.float32) is None or not cpu_native.native_caps() & cpu_native.CAP_T16_F32:
        pytest.skip("no T16 kernels here")
    for n, k, group, scale_dtype in ((48, 256, 64, torch.bfloat16), (64, 384, 128, torch.float32),
                                     (32, 192, 192, torch.float16)):
        mod = QuantLinear.from_qtensor(_layer(n, k, group, True, scale_dtype=scale_dtype), "cpu")
        mod.prepare("cpu", torch.float32)
        state = mod.kernel_state("cpu")
        assert state.t16
        for dtype in (torch.float32, torch.bfloat16):
            expect = mod.dequantize_weight(dtype)
            full = cpu_native.t16_dequantize_t(mod.q, state.scale, state.zero, group, dtype, 0, n)
            if full is None:  # bf16 output without AVX-512 BF16
                assert dtype == torch.bfloat16
                continue
            assert torch.equal(full.t(), expect)
            assert torch.equal(cpu_native.t16_dequantize_t(mod.q, state.scale, state.zero, group, dtype, 16, 32).t(),
                               expect[16:32])
        assert cpu_native.t16_dequantize_t(mod.q, state.scale, state.zero, group, torch.float32, 8, 16) is None
        x = torch.randn(300, k)  # many tokens: the dense path
        assert _rel(cpu_backend.dense_chunked(x, mod.q, state, torch.float32), mod.dequantize_weight(torch.float32)
                    .matmul(x.t()).t() + mod.bias.float()) < 1e-5


def test_layer_keeps_a_bound_kernel_per_dtype() -> None:
    """A layer called with bf16 and fp32 activations in turn keeps both native kernels bound (the eager fast path),
    drops them when its weights change, and stays exact against the oracle throughout."""
    if not native_available():
        pytest.skip("native kernels did not build on this machine")
    qt = _layer(64, 256, 64, True)
    mod, ref = QuantLinear.from_qtensor(qt, "cpu"), QuantLinear.from_qtensor(qt, "reference")
    x = torch.randn(1, 256)
    for dtype in (torch.bfloat16, torch.float32, torch.bfloat16):
        assert _rel(mod(x.to(dtype)), ref(x.to(dtype))) < (1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert set(mod._bound) == {torch.bfloat16, torch.float32}
    mod.load_qtensor(_layer(64, 256, 64, True, seed=3))
    assert not mod._bound
    ref.load_qtensor(_layer(64, 256, 64, True, seed=3))
    assert _rel(mod(x), ref(x)) < 1e-5


def test_avx2_build_runs_fp32_activations_on_its_t16_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without AVX-512 (here: the library built for x86-64-v3) has only the fp32 T16 kernel: fp32 activations
    run on it at every token count, bf16 ones on torch's int4 op."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    if not {"avx2", "fma", "f16c"} <= flags or shutil.which("cc") is None:
        pytest.skip("needs an AVX2 CPU and a C compiler")
    lib = cpu_native.load_library("x86-64-v3")
    assert lib.nq_caps() == cpu_native.CAP_T16_F32
    monkeypatch.setattr(cpu_native, "library", lambda: lib)
    monkeypatch.setattr(cpu_native, "native_caps", lambda: int(lib.nq_caps()))
    qt = _layer(128, 256, 64, True, scale_dtype=torch.float16)
    fast, ref = QuantLinear.from_qtensor(qt, "cpu"), QuantLinear.from_qtensor(qt, "reference")
    for m in (1, 7, 300):  # 300: the dense path, dequantizing unpacked T16 blocks with torch
        x = torch.randn(m, 256)
        assert _rel(fast(x), ref(x)) < TOL[torch.float32] and fast.q_layout == "t16", m
    assert fast.kernel_state("cpu").plan(fast.q, torch.float32).kernel == "native-t16-f32"
    other = QuantLinear.from_qtensor(qt, "cpu")
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    assert _rel(other(x), ref(x)) < 1e-2 and other.q_layout == "rows"
    assert other.kernel_state("cpu").plan(other.q, torch.bfloat16).kernel == "torch-int4"


def test_layer_prepared_under_inference_mode_still_loads_and_runs_outside() -> None:
    """Kernel repacks and scratch buffers made under torch.inference_mode are normal tensors: the layer still takes
    load_state_dict and runs (dense path included) outside it."""
    qt = _layer(128, 256, 64, True)
    mod = QuantLinear.from_qtensor(qt, "cpu")
    cpu_backend._SCRATCH.clear()
    with torch.inference_mode():
        mod(torch.randn(600, 256, dtype=torch.bfloat16))  # many tokens: the dense path's scratch buffer
        mod.prepare("cpu", torch.bfloat16)
    mod.load_state_dict(QuantLinear.from_qtensor(qt, "cpu").state_dict())
    x = torch.randn(600, 256, dtype=torch.bfloat16)
    assert _rel(mod(x), QuantLinear.from_qtensor(qt, "reference")(x)) < 1e-2
