"""CPU backend of QuantLinear: which kernel runs a layer for a call, and the per-layer state it keeps.

* layers with N % 16 == 0 and K, group % 64 == 0 (every LLM-shaped layer): the weights take the T16 layout
  (:mod:`.layout`, built when the layer is prepared; QuantLinear converts back for anything else) and one kernel
  serves every token count, accumulating 16 output rows per vector on broadcast activations: bf16 / fp16
  activations with vdpbf16ps, fp32 ones (and bf16 ones on AVX-512 CPUs without BF16) with the exact fp32 weights
  and FMA. On CPUs with AMX the C dispatcher runs the bf16 kernel on VNNI for few tokens, on AMX tiles from
  ``amx_min_tokens`` and as a tiled GEMM on weights dequantized once per call from ``amx_gemm_min_tokens``.
  ``activations="int8"`` (opt-in, AVX-512 VNNI) sends few-token calls to the VNNI kernel with one int8 per activation
  element (the C dispatcher, by ``native.int8_max_tokens``): the peers' accuracy, not the output's rounding.
* other layers, few tokens: kernels on nibble rows (K % 32); many tokens: dequantize (native, bit exact) blocks of
  output rows into a reused cache-sized buffer and run a dense bf16 / fp32 matmul per block.
* CPUs with AVX2 but no AVX-512: the fp32 T16 kernel (8-lane) for fp32 activations; bf16 ones take torch's op.
* without the native kernels: PyTorch's ``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, G', scales_and_zeros)``
  for few tokens, which computes ``x @ ((q - 8) * scale + zero).T``: AWQ's (q - z) * s becomes ``zero = (8 - z) * s``
  (float domain). Its packed layout depends on the CPU ISA, so it is built at load time (:func:`prepare_torch_int4`),
  never stored. It is fast in bf16 only: bf16/fp16 activations run it in bf16.
Knobs: :class:`~nvila_quant.kernels.cpu.settings.CpuSettings`. A layer no fast kernel can take falls back to the
reference backend (kernels/linear.py). Under ``torch.compile`` the T16 kernel is the registered op
``nvila_quant::cpu_t16_linear`` (whole graphs, no break per layer); the other CPU paths run eagerly as graph breaks.
fp16 activations compute in bf16 (the CPU kernels have no fp16 path); the result is cast back.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nvila_quant.kernels.cpu.layout import t16_unpack
from nvila_quant.kernels.cpu.native import (
    AMX_CPU,
    SCALE_KINDS,
    NativeLayer,
    amx_active,
    dequantize_nibbles,
    native_linear,
    native_linear_support,
    t16_dequantize_t,
    t16_kernel,
    t16_linear,
    t16_shape_ok,
)
from nvila_quant.kernels.cpu.settings import cpu_settings, on_cpu_settings_change
from nvila_quant.numerics.nibbles import unpack_nibbles

__all__ = [
    "DENSE_MIN_TOKENS",
    "CpuState",
    "TorchInt4Weights",
    "cpu_dense_min_tokens",
    "cpu_linear",
    "cpu_support",
    "cpu_t16_linear",
    "few_token_kernel",
    "kernel_group",
    "prepare_cpu",
    "prepare_torch_int4",
    "t16_linear_traced",
    "t16_wanted",
]

TORCH_KERNEL_GROUPS = (256, 128, 64, 32)
# Smallest token count that runs the (chunked) dequantize + dense matmul instead of each few-token kernel: where
# the kernel stops beating the dense path (never, for the bf16 T16 kernel with AVX-512 or AMX; from 32 tokens where the
# OS refuses AMX, as oneDNN's AMX GEMM then wins). Measurements: benchmarks/README.md, "CPU dispatch thresholds".
DENSE_MIN_TOKENS = {"native-bf16": 64, "native-fp32": 12, "torch-int4": 640, "native-t16": 32 if AMX_CPU else 1 << 62,
                    "native-t16-f32": 48 if AMX_CPU else 256}


# Objects that cache decisions taken under the CPU settings (QuantLinear's bound fast path): reset when they change.
SETTINGS_USERS: weakref.WeakSet = weakref.WeakSet()


def _settings_changed(name: str) -> None:
    for user in list(SETTINGS_USERS):  # cached plans of the old value must not be used
        user.settings_changed()


on_cpu_settings_change(_settings_changed)


def _compute_dtype(x_dtype: torch.dtype | None) -> torch.dtype:
    return torch.float32 if x_dtype == torch.float32 else torch.bfloat16


def kernel_group(group: int, in_features: int, allowed: tuple[int, ...] = TORCH_KERNEL_GROUPS) -> int | None:
    """Largest group size of torch's int4 kernel that divides the checkpoint group (K when -1), or None."""
    g = in_features if group == -1 else group
    return next((a for a in allowed if g % a == 0 and in_features % a == 0), None)


def _torch_int4_reason(group: int, out_features: int, in_features: int) -> str | None:
    if out_features % 16:
        return f"out_features={out_features} is not a multiple of 16"
    if kernel_group(group, in_features) is None:
        return f"group_size={group} is not a multiple of 32"
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return "this torch has no _weight_int4pack_mm_for_cpu"
    return None


def few_token_kernel(group: int, out_features: int, in_features: int, x_dtype: torch.dtype | None) -> str | None:
    """"native-bf16" / "native-fp32" / "torch-int4", or None when no fast kernel takes this layer and dtype."""
    compute = _compute_dtype(x_dtype)
    prefer_torch = cpu_settings().kernel == "torch"  # compare with / debug torch's kernel
    if not prefer_torch and native_linear_support(compute, in_features, group):
        return "native-fp32" if compute == torch.float32 else "native-bf16"
    if compute == torch.bfloat16 and _torch_int4_reason(group, out_features, in_features) is None:
        return "torch-int4"
    return None


def cpu_support(bits: int, group: int, out_features: int, in_features: int,
                x_dtype: torch.dtype | None = torch.bfloat16) -> str | None:
    """None when a fast CPU kernel can run this layer for ``x_dtype`` activations, else the reason."""
    if bits != 4:
        return f"bits={bits} (the int4 kernels need 4)"
    if in_features % 2:
        return f"in_features={in_features} is odd"
    if t16_wanted(bits, out_features, in_features, group, x_dtype or torch.bfloat16):
        return None
    if few_token_kernel(group, out_features, in_features, x_dtype) is not None:
        return None
    if _compute_dtype(x_dtype) == torch.float32:
        return ("fp32 activations need the native kernels (AVX-512 with in_features and group_size multiples of 32, "
                "or AVX2 with out_features % 16 == 0 and in_features, group_size multiples of 64)")
    return _torch_int4_reason(group, out_features, in_features) or "no CPU int4 kernel for this layer"


def cpu_dense_min_tokens(kernel: str = "native-bf16") -> int:
    """Token count from which the dense path runs (the settings' ``dense_min_tokens`` overrides)."""
    if cpu_settings().dense_min_tokens is not None:
        return cpu_settings().dense_min_tokens
    if kernel == "native-t16" and amx_active():
        return 1 << 62
    return DENSE_MIN_TOKENS[kernel]


@dataclass
class TorchInt4Weights:
    """Load-time repack for torch's kernel. packed: (N, K/2) uint8 in torch's CPU layout;
    scales_and_zeros: (K/G', N, 2) bf16; group: G'."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    group: int


def prepare_torch_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> TorchInt4Weights:
    """q (N, K) uint8, scale (N, K/group) float, zero (N, K/group) int -> TorchInt4Weights (group: real size)."""
    n, k = q.shape
    kg = kernel_group(group, k)
    if kg is None:
        raise ValueError(f"no torch int4 kernel group divides group_size={group} (in_features={k})")
    rep = group // kg  # a checkpoint group = rep kernel groups with the same scale and zero: exact
    s = scale.float().repeat_interleave(rep, dim=1)  # (N, K/G')
    z = zero.float().repeat_interleave(rep, dim=1)
    sz = torch.stack([s, (8 - z) * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (K/G', N, 2)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    return TorchInt4Weights(packed, sz, kg)


@dataclass
class CpuState:
    """What the CPU backend keeps per layer: the module's own scale (its dtype when fp32/bf16/fp16) and uint8 zero
    points (read as stored: no copies), an fp32 bias and, only when torch's kernel is the few-token kernel, its
    repack (built on first use)."""

    scale: torch.Tensor  # (N, K/G) fp32, bf16 or fp16; (K/G, N) when t16
    zero: torch.Tensor  # (N, K/G) uint8; (K/G, N) when t16
    bias: torch.Tensor | None  # (N,) fp32
    group: int
    t16: bool = False  # the weights are in the T16 layout (bf16 / fp16 activations only)
    torch_int4: TorchInt4Weights | None = None
    plans: dict = field(default_factory=dict)  # (x dtype, overrides) -> Plan

    def plan(self, qnib: torch.Tensor, x_dtype: torch.dtype) -> Plan:
        """The few-token kernel for ``x_dtype`` activations and the token count from which the dense path runs,
        decided once per dtype (and per value of the overrides)."""
        settings = cpu_settings()
        key = (x_dtype, settings.kernel, settings.dense_min_tokens)
        plan = self.plans.get(key)
        if plan is None:
            n, k = qnib.shape[0], qnib.shape[1] * 2
            bound = None
            if self.t16:
                if settings.kernel == "torch" and x_dtype != torch.float32:
                    kernel = "torch-int4"
                elif t16_kernel(x_dtype) == "bf16":
                    kernel = "native-t16"
                    bound = NativeLayer(qnib, self.scale, self.zero, self.bias, self.group, t16=True)
                else:
                    kernel = "native-t16-f32"
                    if x_dtype == torch.float32:
                        bound = NativeLayer(qnib, self.scale, self.zero, self.bias, self.group, t16=True,
                                            dtype=torch.float32)
            else:
                kernel = few_token_kernel(self.group, n, k, x_dtype)
                if kernel == "native-bf16" and x_dtype == torch.bfloat16 and NativeLayer.supports(k, self.group):
                    bound = NativeLayer(qnib, self.scale, self.zero, self.bias, self.group)
            plan = Plan(kernel, cpu_dense_min_tokens(kernel) if kernel else 0, bound)
            if bound is not None:
                bound.max_numel = plan.dense_from * k
            # torch's CPU-dependent repack, once (at load, when the runtime prepares the layer for its dtype)
            if kernel == "torch-int4" and self.torch_int4 is None:
                scale, zero = _meta_rows(self)
                self.torch_int4 = prepare_torch_int4(unpack_nibbles(_rows(qnib, self)), scale, zero, self.group)
            self.plans[key] = plan
        return plan


class Plan(NamedTuple):
    kernel: str | None  # the few-token kernel, None: dense path only
    dense_from: int  # token count from which the dense path runs
    bound: NativeLayer | None  # the native bf16 kernel bound to the layer (bf16 activations, K % 64 == 0)


def prepare_cpu(scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None, group: int,
                t16: bool = False) -> CpuState:
    """The per-layer CPU state; ``t16``: the weights are in the T16 layout (scale and zero are kept transposed)."""
    if scale.dtype not in SCALE_KINDS:
        scale = scale.float()
    zero = zero.to(torch.uint8)
    if t16:
        scale, zero = scale.t(), zero.t()
    return CpuState(scale.contiguous(), zero.contiguous(), None if bias is None else bias.float().contiguous(), group,
                    t16)


def t16_wanted(bits: int, out_features: int, in_features: int, group: int, x_dtype: torch.dtype) -> bool:
    """Whether a layer's weights should take the T16 layout for CPU calls with ``x_dtype`` activations."""
    return bits == 4 and t16_shape_ok(out_features, in_features, group) and t16_kernel(x_dtype) is not None


def _rows(qnib: torch.Tensor, state: CpuState) -> torch.Tensor:
    return t16_unpack(qnib) if state.t16 else qnib


def _meta_rows(state: CpuState, r0: int = 0, r1: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero points of output rows r0:r1 as (rows, K/G)."""
    if state.t16:
        return state.scale[:, r0:r1].t(), state.zero[:, r0:r1].t()
    return state.scale[r0:r1], state.zero[r0:r1]


_SCRATCH: dict[torch.dtype, torch.Tensor] = {}
# Dequantized weight rows per dense matmul while the activations are small (a block its matmul re-reads from cache);
# from CHUNK_MAX_TOKENS tokens one block (each block's matmul would repack the activations). Measurements:
# benchmarks/README.md, "CPU dispatch thresholds"; NVILA_QUANT_CPU_CHUNK_MB overrides (0: one block always).
CHUNK_ROWS = 512
CHUNK_MAX_TOKENS = 256


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A reused flat buffer (no page faults per call; never handed to autograd). A normal tensor even when first
    needed under ``torch.inference_mode`` (an inference tensor could not be written to outside it later)."""
    buf = _SCRATCH.get(dtype)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):
            buf = _SCRATCH[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def dense_chunked(x2: torch.Tensor, qnib: torch.Tensor, state: CpuState, dtype: torch.dtype) -> torch.Tensor:
    """x2 (M, K) -> (M, N): dequantize a block of output rows into a cache-sized buffer, matmul it, repeat."""
    n, k = qnib.shape[0], qnib.shape[1] * 2
    chunk_mb = cpu_settings().chunk_mb
    if chunk_mb is not None:  # 0 = one block
        chunk_bytes = int(chunk_mb * 1024**2)
        rows = n if chunk_bytes <= 0 else max(16, min(n, chunk_bytes // (k * torch.finfo(dtype).bits // 8)) // 16 * 16)
    else:
        rows = min(n, CHUNK_ROWS) if x2.shape[0] < CHUNK_MAX_TOKENS else n
    buf = _scratch(rows * k, dtype)
    x2 = x2.to(dtype)
    outs = []
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = None
        if state.t16:  # W^T straight from the T16 layout (no unpack to rows); F.linear takes its transpose as is
            w_t = t16_dequantize_t(qnib, state.scale, state.zero, state.group, dtype, r0, r1,
                                   out=buf[: (r1 - r0) * k].view(k, r1 - r0))
            w = None if w_t is None else w_t.t()
        if w is None:
            scale, zero = _meta_rows(state, r0, r1)
            w = dequantize_nibbles(_rows(qnib[r0:r1], state), scale, zero, state.group, dtype,
                                   out=buf[: (r1 - r0) * k].view(r1 - r0, k))
        outs.append(F.linear(x2, w, None if state.bias is None else state.bias[r0:r1].to(dtype)))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


@torch.compiler.disable  # ctypes and torch's CPU int4 op: run eagerly inside compiled graphs
def cpu_linear(x: torch.Tensor, qnib: torch.Tensor, state: CpuState) -> torch.Tensor:
    """x (..., K) bf16/fp16/fp32 -> (..., N) in x's dtype. qnib: (N, K/2) uint8, nibble rows or T16 (state.t16)."""
    shape = x.shape
    n, k = qnib.shape[0], shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    compute = _compute_dtype(x.dtype)
    kernel, dense_from, bound = state.plan(qnib, x.dtype)
    needs_grad = x.requires_grad and torch.is_grad_enabled()  # the fused kernels have no backward
    if kernel is not None and m < dense_from and not needs_grad:
        if kernel == "native-t16":
            y = bound(x2.to(torch.bfloat16).contiguous())
        elif kernel == "native-t16-f32":
            y = bound(x2.contiguous()) if bound is not None else t16_linear(x2, qnib, state.scale, state.zero,
                                                                             state.bias, state.group)
        elif kernel[0] == "n":  # native-bf16 / native-fp32 on nibble rows
            y = native_linear(x2 if x2.dtype == compute else x2.to(compute), qnib, state.scale, state.zero,
                              state.bias, state.group)
        else:
            t = state.torch_int4  # built by the plan
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), t.packed, t.group,
                                                           t.scales_and_zeros)
            if state.bias is not None:
                y = y + state.bias.to(y.dtype)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*shape[:-1], n)
    if needs_grad:  # autograd keeps the weight: a fresh one, not the shared scratch buffer
        scale, zero = _meta_rows(state)
        w = dequantize_nibbles(_rows(qnib, state), scale, zero, state.group, compute)
        y = F.linear(x2.to(compute), w, None if state.bias is None else state.bias.to(compute))
    else:
        y = dense_chunked(x2, qnib, state, compute)
    return y.to(x.dtype).reshape(*shape[:-1], n)


@torch.library.custom_op("nvila_quant::cpu_t16_linear", mutates_args=())
def cpu_t16_linear(x: torch.Tensor, q: torch.Tensor, scale_t: torch.Tensor, zero_t: torch.Tensor,
                   bias: torch.Tensor | None, group: int) -> torch.Tensor:
    """x (M, K) -> (M, N) in x's dtype with T16 weights q (N, K/2), scale_t / zero_t (K/G, N), bias (N,) fp32."""
    return t16_linear(x, q, scale_t, zero_t, bias, group)


@cpu_t16_linear.register_fake
def _(x, q, scale_t, zero_t, bias, group):  # noqa: ANN001, ANN202 (fake impl: shapes only)
    return x.new_empty(x.shape[0], q.shape[0])


def t16_linear_traced(x: torch.Tensor, qnib: torch.Tensor, state: CpuState) -> torch.Tensor:
    """:func:`cpu_linear` for T16 weights through the registered op (what ``torch.compile`` traces)."""
    shape = x.shape
    y = torch.ops.nvila_quant.cpu_t16_linear(x.reshape(-1, shape[-1]), qnib, state.scale, state.zero, state.bias,
                                             state.group)
    return y.reshape(*shape[:-1], qnib.shape[0])
