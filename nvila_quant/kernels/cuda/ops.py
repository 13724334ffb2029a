"""The CUDA kernels as ``torch.library`` custom ops (``torch.ops.nvila_quant.*``), for ``torch.compile``: opaque ops
with fake implementations, so a compiled graph keeps each call whole.

    w4a16_linear(x, qweight, scales, zeros, bias, group) -> out            nibble rows, x (M, K) fp16/bf16
    w4a16_linear_out(x, qweight, scales, zeros, bias, group, out) -> None  writes a caller-provided out
    w4a16_mma_linear(x, qweight, scales_t, zeros_t, bias, group) -> out    mma layout, the skinny GEMM
    w4a16_mma_gemm(x, qweight, scales_t, zeros_t, bias, group) -> out      mma layout, the tiled GEMM
    w4a16_dequant / w4a16_mma_dequant(qweight, scales, zeros, group, dtype) -> w (N, K)
"""

from __future__ import annotations

import torch

from nvila_quant.kernels.cuda.native import (
    device_library,
    mma_dequant_into,
    mma_launch,
    rows_dequant_into,
    rows_launch,
)

__all__ = ["aligned", "w4a16_dequant", "w4a16_linear", "w4a16_linear_out", "w4a16_mma_dequant", "w4a16_mma_gemm",
           "w4a16_mma_linear"]


def aligned(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


@torch.library.custom_op("nvila_quant::w4a16_linear", mutates_args=())
def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None, group: int) -> torch.Tensor:
    """x (M, K) -> (M, N): every element written by the kernel."""
    x = aligned(x)
    out = torch.empty(x.shape[0], qweight.shape[0], dtype=x.dtype, device=x.device)
    rows_launch(x, qweight, scales, zeros, bias, group, out)
    return out


@w4a16_linear.register_fake
def _(x, qweight, scales, zeros, bias, group):  # noqa: ANN001, ANN202 (fake impl: shapes only)
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("nvila_quant::w4a16_linear_out", mutates_args=("out",))
def w4a16_linear_out(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     bias: torch.Tensor | None, group: int, out: torch.Tensor) -> None:
    """Writes x @ W^T + b into a caller-provided ``out`` (M, N) (e.g. a NaN-poisoned buffer in tests)."""
    rows_launch(aligned(x), qweight, scales, zeros, bias, group, out)


@w4a16_linear_out.register_fake
def _(x, qweight, scales, zeros, bias, group, out):  # noqa: ANN001, ANN202
    return None


@torch.library.custom_op("nvila_quant::w4a16_mma_linear", mutates_args=())
def w4a16_mma_linear(x: torch.Tensor, qweight: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor,
                     bias: torch.Tensor | None, group: int) -> torch.Tensor:
    """x (M, K) -> (M, N) with mma-layout weights: every element written by the kernel."""
    x = aligned(x)
    out = torch.empty(x.shape[0], qweight.shape[0], dtype=x.dtype, device=x.device)
    mma_launch(device_library(x), x, qweight, scales_t, zeros_t, bias, group, out)
    return out


@w4a16_mma_linear.register_fake
def _(x, qweight, scales_t, zeros_t, bias, group):  # noqa: ANN001, ANN202 (fake impl: shapes only)
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("nvila_quant::w4a16_mma_gemm", mutates_args=())
def w4a16_mma_gemm(x: torch.Tensor, qweight: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor,
                   bias: torch.Tensor | None, group: int) -> torch.Tensor:
    """x (M, K) -> (M, N) with mma-layout weights, the tiled GEMM (many tokens)."""
    x = aligned(x)
    out = torch.empty(x.shape[0], qweight.shape[0], dtype=x.dtype, device=x.device)
    mma_launch(device_library(x), x, qweight, scales_t, zeros_t, bias, group, out, tiled=True)
    return out


@w4a16_mma_gemm.register_fake
def _(x, qweight, scales_t, zeros_t, bias, group):  # noqa: ANN001, ANN202 (fake impl: shapes only)
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("nvila_quant::w4a16_mma_dequant", mutates_args=())
def w4a16_mma_dequant(qweight: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor, group: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """(N, K) fp16/bf16 weight from the mma layout."""
    w = torch.empty(qweight.shape[0], qweight.shape[1] * 8, dtype=dtype, device=qweight.device)
    return mma_dequant_into(device_library(qweight), qweight, scales_t, zeros_t, group, w)


@w4a16_mma_dequant.register_fake
def _(qweight, scales_t, zeros_t, group, dtype):  # noqa: ANN001, ANN202 (fake impl: shapes only)
    return qweight.new_empty(qweight.shape[0], qweight.shape[1] * 8, dtype=dtype)




@torch.library.custom_op("nvila_quant::w4a16_dequant", mutates_args=())
def w4a16_dequant(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """(N, K) fp16/bf16 weight from nibble rows."""
    w = torch.empty(qweight.shape[0], qweight.shape[1] * 8, dtype=dtype, device=qweight.device)
    return rows_dequant_into(device_library(qweight), qweight, scales, zeros, group, w)


@w4a16_dequant.register_fake
def _(qweight, scales, zeros, group, dtype):  # noqa: ANN001, ANN202 (fake impl: shapes only)
    return qweight.new_empty(qweight.shape[0], qweight.shape[1] * 8, dtype=dtype)

