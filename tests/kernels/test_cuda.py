"""CUDA W4A16 kernels: nvcc compile check (sm_80, sm_90), host-side argument checks, and GPU correctness.

GPU tests (``-m cuda``) compare against the reference backend on random shapes with fresh inputs per check
and NaN-poisoned outputs, so an element the kernel forgets to write fails the test.
"""

from __future__ import annotations

import ctypes
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nvila_quant.formats import QTensor
from nvila_quant.kernels.cuda.dispatch import GEMV_MAX_TOKENS, cuda_support, mma_self_check, prepare_cuda
from nvila_quant.kernels.cuda.native import CUDA_SOURCES, build_library, library, mma_launch
from nvila_quant.kernels.cuda.settings import cuda_settings
from nvila_quant.kernels.linear import QuantLinear

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_sources_compile(arch: str, tmp_path: Path) -> None:
    for src in CUDA_SOURCES:
        cmd = [NVCC, "-O3", "-std=c++17", "-c", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Werror",
               "all-warnings", str(src), "-o", str(tmp_path / f"{src.stem}_sm{arch}.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]


def _call(lib: ctypes.CDLL, m: int, n: int, k: int, group: int, dtype: int = 1, x: int = 4096, q: int = 4096):
    err = ctypes.create_string_buffer(256)
    rc = lib.nq_w4a16_linear(ctypes.c_void_p(x), ctypes.c_void_p(q), ctypes.c_void_p(64), ctypes.c_void_p(64),
                             None, ctypes.c_void_p(64), m, n, k, group, dtype, None, err, len(err))
    return rc, err.value.decode()


@needs_nvcc
@pytest.mark.skipif(torch.cuda.is_available(), reason="probes invalid pointers: only without a GPU")
def test_library_refuses_unsupported_arguments_before_launch() -> None:
    """The built library loads without a GPU; bad shapes come back as errors with the expected-vs-got reason."""
    lib = ctypes.CDLL(str(build_library("80")))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.nq_w4a16_linear.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int, ptr,
                                    ctypes.c_char_p, ctypes.c_int]
    assert lib.nq_abi_version() == 2
    assert _call(lib, 1, 64, 48, 48)[0] == 1
    assert "K % 32 == 0" in _call(lib, 1, 64, 48, 48)[1] and "got K=48 group=48" in _call(lib, 1, 64, 48, 48)[1]
    assert "got K=128 group=48" in _call(lib, 4, 64, 128, 48)[1]
    assert "bad sizes" in _call(lib, 1, 0, 128, 32)[1]
    assert "dtype" in _call(lib, 1, 64, 128, 32, dtype=2)[1]
    assert "16-byte aligned" in _call(lib, 1, 64, 128, 32, x=4100)[1]
    assert _call(lib, 0, 64, 128, 32) == (0, "")  # no tokens: nothing to do, nothing launched
    rc, msg = _call(lib, 3, 64, 128, 32)  # valid shapes, no device: the launch error is reported, no crash
    assert rc == 1 and msg
    lib.nq_w4a16_dequant.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int, ptr, ctypes.c_char_p,
                                     ctypes.c_int]
    err = ctypes.create_string_buffer(256)
    p = ctypes.c_void_p(4096)
    assert lib.nq_w4a16_dequant(p, p, p, p, 64, 128, 48, 0, None, err, len(err)) == 1
    assert "group=48" in err.value.decode()
    assert lib.nq_w4a16_dequant(p, p, p, ctypes.c_void_p(4100), 64, 128, 32, 0, None, err, len(err)) == 1
    assert "16-byte aligned" in err.value.decode()


def test_cuda_support_reasons() -> None:
    assert cuda_support(3, 128, 64, 256) == "bits=3 (the W4A16 kernels need 4)"
    assert cuda_support(4, 128, 64, 48) == "in_features=48 is not a multiple of 32"
    assert cuda_support(4, 48, 64, 96) == "group_size=48 is not a multiple of 32"
    assert "float32" in cuda_support(4, 32, 64, 96, torch.float32)


# ---------------------------------------------------------------------------------------------- GPU
def _random_case(rng: random.Random) -> tuple[int, int, int, int, torch.dtype, bool]:
    n = rng.choice([8, 40, 96, 130, 256, 1000, 1056, 4096])  # N tails that are not multiples of the 128-wide tile
    k = 32 * rng.randint(1, 96)
    group = rng.choice([g for g in (32, 64, 128, k) if k % g == 0])
    m = rng.choice([1, 2, 3, 5, 7, 8, 9, 17, 31, 33, 64, 129, 300])
    return m, n, k, group, rng.choice([torch.float16, torch.bfloat16]), rng.random() < 0.5


def _close(out: torch.Tensor, ref: torch.Tensor, what: tuple) -> None:
    assert not out.isnan().any(), what
    rel = float((out.float() - ref).norm() / ref.norm())
    assert rel < 1e-2, (*what, rel)


@pytest.mark.cuda
def test_cuda_kernels_match_reference_with_poisoned_outputs() -> None:
    rng = random.Random(0)
    lib = library(torch.cuda.current_device())
    for _ in range(48):
        m, n, k, group, dtype, bias = _random_case(rng)
        case = (m, n, k, group, dtype, bias)
        w = torch.randn(n, k)
        qt = QTensor.from_float(w, 4, group, True, bias=torch.randn(n) if bias else None, scale_dtype=dtype)
        mod = QuantLinear.from_qtensor(qt, backend="cuda").cuda()
        assert mod.resolve_backend(torch.device("cuda"), dtype) == "cuda"
        mod.prepare("cuda")
        cw = mod._prepared["cuda"]
        assert cw.layout == ("mma" if n % 32 == 0 else "rows"), case
        x = torch.randn(m, k, device="cuda").to(dtype)  # fresh input per check
        b = None if mod.bias is None else mod.bias.to(dtype)
        ref = F.linear(x.float(), mod.dequantize_weight(dtype).float(), None if b is None else b.float())
        w = mod.dequantize_weight(dtype)
        # the nibble-row kernels, on every shape
        rows = prepare_cuda(mod.nibble_rows(), mod.scale, mod.zero, group, k)
        out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        torch.ops.nvila_quant.w4a16_linear_out(x, rows.qweight, rows.scales, rows.zeros, b, rows.group, out)
        _close(out, ref, case)
        assert torch.equal(torch.ops.nvila_quant.w4a16_dequant(rows.qweight, rows.scales, rows.zeros, group, dtype), w)
        if cw.layout == "mma":  # the tensor-core kernel, with every K split
            for ksplit, warps, tiled in ((1, 8, False), (2, 16, False), (3, 8, False), (1, None, True),
                                         (2, None, True)):
                if ksplit <= k // 32:
                    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                    mma_launch(lib, x, cw.qweight, cw.scales, cw.zeros, b, group, out, ksplit, warps=warps, tiled=tiled)
                    _close(out, ref, (*case, ksplit, warps, tiled))
            assert torch.equal(torch.ops.nvila_quant.w4a16_mma_dequant(cw.qweight, cw.scales, cw.zeros, group, dtype),
                               w)
        fused_max = cuda_settings().mma_max_tokens if cw.layout == "mma" else GEMV_MAX_TOKENS
        if m <= fused_max:
            _close(mod(x), ref, case)
        else:  # the module path = dequantize (bit exact, above) + cuBLAS
            assert torch.equal(mod(x), F.linear(x, w, b))


@pytest.mark.cuda
def test_mma_self_check_passes_on_this_gpu() -> None:
    assert mma_self_check(torch.cuda.current_device()) is None


@pytest.mark.cuda
def test_cuda_unsupported_shapes_fall_back_or_raise() -> None:
    qt = QTensor.from_float(torch.randn(64, 96), 4, 48, True, scale_dtype=torch.float16)
    mod = QuantLinear.from_qtensor(qt, backend="cuda").cuda()
    x = torch.randn(3, 96, device="cuda", dtype=torch.float16)
    assert mod.resolve_backend(x.device, x.dtype) == "reference"
    ref = QuantLinear.from_qtensor(qt, backend="reference").cuda()
    assert torch.equal(mod(x), ref(x))
    qw = torch.zeros(64, 12, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="group size that is a multiple of 32"):
        torch.ops.nvila_quant.w4a16_linear(x, qw, torch.ones(64, 2, device="cuda"),
                                           torch.zeros(64, 2, dtype=torch.uint8, device="cuda"), None, 48)


@pytest.mark.cuda
def test_cuda_op_in_torch_compile_and_cuda_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    qt = QTensor.from_float(torch.randn(256, 512), 4, 128, True, bias=torch.randn(256), scale_dtype=torch.bfloat16)
    mod = QuantLinear.from_qtensor(qt, backend="cuda").cuda()
    mod.prepare("cuda")
    for m in (1, 20, 48):  # the skinny mma kernel (one and two token groups), dequantize + cuBLAS
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        eager = mod(x)
        compiled = torch.compile(mod, fullgraph=True)
        assert torch.equal(compiled(x), eager)
        static_x = x.clone()
        mod(static_x)  # warm up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = mod(static_x)
        fresh = torch.randn_like(x)
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, mod(fresh))
    monkeypatch.setattr(cuda_settings(), "gemm", "fused")  # many tokens on the tiled mma GEMM op
    torch._dynamo.reset()
    x = torch.randn(150, 512, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(torch.compile(mod, fullgraph=True)(x), mod(x))
