"""The native ops between the linears of a batch-1 Qwen2 decode step on CPU (``csrc/step.c``), for the lean decode
step (:mod:`nvila_quant.model.lean_decode`): one call each instead of a dozen aten ops.

Tensors are contiguous CPU fp32 or bf16 activations; the caller checks shapes once when it allocates its buffers,
so a call only passes pointers. Each op is bitwise the eager transformers op where that op is elementwise; the two
reductions (RMSNorm's mean of squares, attention) add in another order (see the C file).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from nvila_quant.kernels.cpu.native import NativeLayer, check_rc, library

__all__ = ["STEP_DTYPES", "LinearGroup", "StepOps", "step_ops"]

STEP_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


class StepOps:
    """Bound entry points of ``csrc/step.c`` (see there for the arithmetic)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        i64, ptr, cint, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        self._norm = lib.nq_step_add_rmsnorm
        self._norm.argtypes, self._norm.restype = [ptr, ptr, ptr, ptr, i64, f32, cint, cint, cint], cint
        self._rope = lib.nq_step_rope_kv
        self._rope.argtypes = [ptr, i64, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, i64, cint]
        self._rope.restype = cint
        self._attend = lib.nq_step_attend
        self._attend.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, i64, f32, ptr, ptr, cint]
        self._attend.restype = cint
        self._silu = lib.nq_step_silu_mul
        self._silu.argtypes, self._silu.restype = [ptr, ptr, ptr, i64, cint], cint
        self.group_call = lib.nq_layers_t16_bf16
        self.group_call.argtypes, self.group_call.restype = [ptr, cint, ptr, ptr, i64, cint], cint

    def add_rmsnorm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor,
                    eps: float) -> torch.Tensor:
        """x (H,) += delta (in place, rounded), then out = weight * round(x * rsqrt(mean(x^2) + eps))."""
        rc = self._norm(x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(), out.data_ptr(),
                        x.numel(), eps, STEP_DTYPES[x.dtype], STEP_DTYPES[weight.dtype], STEP_DTYPES[out.dtype])
        if rc:
            check_rc(rc, "nq_step_add_rmsnorm", H=x.numel())
        return out

    def rope_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor, pos: int) -> None:
        """Rotate q (Hq * D) and k (Hkv * D) in place; write k and v into the fp32 caches (Hkv, max_len, D) at pos."""
        hkv, max_len, d = keys.shape
        rc = self._rope(q.data_ptr(), q.numel() // d, k.data_ptr(), v.data_ptr(), hkv, d, cos.data_ptr(),
                        sin.data_ptr(), keys[:, pos].data_ptr(), values[:, pos].data_ptr(), max_len * d,
                        STEP_DTYPES[q.dtype])
        if rc:
            check_rc(rc, "nq_step_rope_kv", q=q.shape, k=k.shape, cache=keys.shape)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int, scale: float,
               out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """out (Hq * D) = softmax(scale q k^T) v over the first ``length`` cached positions (GQA); scratch: fp32,
        at least ``length`` elements."""
        hkv, max_len, d = keys.shape
        rc = self._attend(q.data_ptr(), q.numel() // d, hkv, d, keys.data_ptr(), values.data_ptr(), length,
                          max_len * d, scale, out.data_ptr(), scratch.data_ptr(), STEP_DTYPES[q.dtype])
        if rc:
            check_rc(rc, "nq_step_attend", q=q.shape, cache=keys.shape, length=length)
        return out

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = round(round(silu(gate)) * up)."""
        rc = self._silu(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), STEP_DTYPES[gate.dtype])
        if rc:
            check_rc(rc, "nq_step_silu_mul", N=gate.numel())
        return out


class LinearGroup:
    """T16 bf16 layers that read the same input (a decoder layer's q / k / v, or gate / up), run by one native call
    into fixed output buffers: ``group(x (1, 1, K))`` fills ``outs[i]`` (1, 1, N_i) with what layer i's own call
    returns. :meth:`of` builds one where every layer has such a kernel, sharing K and the group size."""

    GROUP_MAX = 8  # nq_layers_t16_bf16's limit

    def __init__(self, ops: StepOps, kernels: list[NativeLayer], outs: list[torch.Tensor]) -> None:
        self.kernels, self.outs = kernels, outs  # (kept alive: the call reads their memory)
        self.call = ops.group_call
        self.layer_ptrs = (ctypes.c_void_p * len(kernels))(*(k.ptr for k in kernels))
        self.out_ptrs = (ctypes.c_void_p * len(outs))(*(o.data_ptr() for o in outs))
        self.count, self.k = len(kernels), kernels[0].k

    @classmethod
    def of(cls, ops: StepOps, kernels: list[object | None],
           outs: list[torch.Tensor] | None = None) -> LinearGroup | None:
        """A group of ``kernels`` (QuantLinear.native_kernel's, bf16), or None where they cannot share a call.
        ``outs``: the output buffers (1, 1, N_i) bf16 to write (groups of the same shapes may share them)."""
        if not 1 <= len(kernels) <= cls.GROUP_MAX or not all(isinstance(k, NativeLayer) for k in kernels):
            return None
        if any(k.name != "nq_layer_t16_bf16" or k.dtype != torch.bfloat16 for k in kernels):
            return None
        if len({(k.k, k.struct.group) for k in kernels}) != 1:
            return None
        if outs is None:
            outs = [torch.empty(1, 1, k.n, dtype=torch.bfloat16) for k in kernels]
        if [(o.shape, o.dtype, o.is_contiguous()) for o in outs] != [((1, 1, k.n), torch.bfloat16, True)
                                                                      for k in kernels]:
            raise ValueError("LinearGroup: an output buffer does not match its layer (1, 1, N) bf16, contiguous")
        return cls(ops, kernels, outs)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (1, 1, K) bf16, contiguous -> the outputs (rewritten by the next call)."""
        rc = self.call(self.layer_ptrs, self.count, x.data_ptr(), self.out_ptrs, 1, torch.get_num_threads())
        if rc:
            check_rc(rc, "nq_layers_t16_bf16", x=x.shape, layers=self.count)
        return self.outs


@functools.lru_cache(maxsize=4)
def _bind(lib: ctypes.CDLL) -> StepOps:
    return StepOps(lib)


def step_ops() -> StepOps | None:
    """The ops, or None where the native library is not available (the caller runs torch ops instead)."""
    lib = library()
    return None if lib is None else _bind(lib)
