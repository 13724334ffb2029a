"""``Int8Linear``: a W8A8 linear (int8 weights per output channel, int8 activations quantized per token at run time).

Backends: "int8" multiplies the int8 operands with ``torch._int_mm`` (oneDNN VNNI / AMX on CPU, tensor cores on
CUDA), on CPU with the activations' quantization and the sums' rescale in one native pass each
(``kernels/cpu/csrc/int8.c``, bitwise the torch ops); "reference" computes the same int32 sums in float64, the
oracle. Both give the same integers, so their outputs agree to the rescale's rounding.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

from nvila_quant.kernels.cpu.native import library
from nvila_quant.numerics.int8 import quantize_weight, w8a8_linear

__all__ = ["INT8_BACKENDS", "Int8Linear", "int8_linears"]

INT8_BACKENDS = ("int8", "reference")


@functools.cache
def _native() -> ctypes.CDLL | None:
    lib = library()
    if lib is None:
        return None
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.nq_i8_quantize_rows.argtypes = [ptr, cint, i64, i64, ptr, ptr, cint]
    lib.nq_i8_rescale.argtypes = [ptr, ptr, ptr, ptr, ptr, cint, i64, i64, cint]
    return lib


_DT = {torch.float32: 0, torch.bfloat16: 1}


def native_w8a8(x: torch.Tensor, wt: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor | None:
    """The CPU W8A8 linear with native quantize / rescale around ``torch._int_mm``; None where it does not apply
    (no native library, another device or dtype). x: (..., K), wt: (K, N) int8, w_scale: (N, 1) fp32."""
    lib = _native()
    if lib is None or x.device.type != "cpu" or x.dtype not in _DT or not hasattr(torch, "_int_mm"):
        return None
    shape, (k, n) = x.shape, wt.shape
    x2 = x.reshape(-1, k).contiguous()
    t, threads = x2.shape[0], torch.get_num_threads()
    q = torch.empty(t, k, dtype=torch.int8)
    xs = torch.empty(t, dtype=torch.float32)
    if lib.nq_i8_quantize_rows(x2.data_ptr(), _DT[x.dtype], t, k, q.data_ptr(), xs.data_ptr(), threads):
        return None
    acc = torch._int_mm(q, wt)  # (T, N) int32
    ws = w_scale.float().reshape(-1).contiguous()
    b = None if bias is None else bias.float().contiguous()
    out = torch.empty(t, n, dtype=x.dtype)
    if lib.nq_i8_rescale(acc.data_ptr(), xs.data_ptr(), ws.data_ptr(), None if b is None else b.data_ptr(),
                         out.data_ptr(), _DT[x.dtype], t, n, threads):
        return None
    return out.reshape(*shape[:-1], n)


class Int8Linear(nn.Module):
    """y = int8(x) @ int8(W)^T * s_x * s_w + bias. Buffers named as compressed-tensors' ``int-quantized`` tensors:
    ``weight`` (N, K) int8, ``weight_scale`` (N, 1) float32, ``bias`` (N,) in the compute dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.backend = "int8"
        self._wt: tuple[tuple, torch.Tensor] | None = None  # (the weight's identity, its (K, N) transpose)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize a float linear (per output channel, symmetric)."""
        w = linear.weight.detach()
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        q, s = quantize_weight(w)
        out.weight.copy_(q)
        out.weight_scale.copy_(s)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach())
        return out

    def dequantized(self) -> torch.Tensor:
        """W' = q * s, (N, K) float32."""
        return self.weight.float() * self.weight_scale

    def _transposed(self) -> torch.Tensor:
        """The (K, N) int8 operand ``torch._int_mm`` takes, made once per weight tensor (a load or ``to`` replaces the
        tensor; write a new weight with assignment, not in place)."""
        key = (id(self.weight), self.weight.data_ptr(), self.weight.device)
        if self._wt is None or self._wt[0] != key:
            self._wt = (key, self.weight.t().contiguous())
        return self._wt[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        ref = self.backend == "reference"
        if not ref and x.device.type == "cpu":
            y = native_w8a8(x, self._transposed(), self.weight_scale, self.bias)
            if y is not None:
                return y
        return w8a8_linear(x, self.weight, self.weight_scale, self.bias, exact_reference=ref,
                           qw_t=None if ref else self._transposed())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"


def int8_linears(model: nn.Module) -> dict[str, Int8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}
