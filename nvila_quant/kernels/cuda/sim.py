"""The mma-layout CUDA kernels (``w4a16_mma.cu``) compiled for the CPU against ``cuda_sim.h``: one CPU thread per
CUDA thread, tensor-core instructions emulated with the PTX fragment layouts. Slow; for tests that check the
kernels' indexing, bounds and numerics without a GPU. Same C entry points as the CUDA library."""

from __future__ import annotations

import ctypes
import functools
import shutil
from pathlib import Path

from nvila_quant.kernels.build import BuildError, build_shared_library
from nvila_quant.kernels.cuda.native import declare_mma

__all__ = ["SIM_HEADER", "set_cp_async_mode", "sim_library"]

SIM_HEADER = Path(__file__).parent / "csrc" / "cuda_sim.h"
SIM_SOURCE = Path(__file__).parent / "csrc" / "w4a16_mma.cu"


@functools.cache
def sim_library() -> ctypes.CDLL:
    """Build (once, cached) and load the simulated kernels; raises BuildError without a C++20 compiler."""
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise BuildError("no C++ compiler (g++, c++ or clang++) on PATH")
    flags = ["-O2", "-std=c++20", "-shared", "-fPIC", "-pthread", "-DNQ_SIM", "-Wno-unknown-pragmas", "-x", "c++"]
    path = build_shared_library("nq_w4a16_mma_sim", [SIM_SOURCE], cxx, flags, "cpu-sim", depends=[SIM_HEADER])
    lib = declare_mma(ctypes.CDLL(str(path)))
    lib.nq_sim_set_cp_async_mode.argtypes = [ctypes.c_int]
    return lib


def set_cp_async_mode(deferred: bool) -> None:
    """Simulated cp.async copies land when issued (False) or only when waited for (True): see cuda_sim.h."""
    sim_library().nq_sim_set_cp_async_mode(1 if deferred else 0)
