"""TinyChat v2 / AutoAWQ "GEMV_FAST" layout (what llm-awq's current kernels read).

Tensors of a module ``<name>`` (N = out_features, K = in_features, G = group size, K when -1,
Gp = number of groups rounded up to a multiple of 8):
    qweight:      (N/4, K) int16   per 32-wide K chunk values reordered by CHUNK_ORDER, then 4 output rows
                                   interleaved over 64-wide K stripes; 4 values per int16, low nibble first
    scales:       (Gp, N) float    the QTensor's scale dtype; rows past the real groups are zero
    scaled_zeros: (Gp, N) float    -(scale * zero) rounded once to the scale dtype, so w = q * s + scaled_zeros
    bias:         (N,) float       optional
4-bit only; N % 4 == 0 and K % 64 == 0. Zero points are recovered as round(-scaled_zeros / scale), which is
exact for 4-bit zero points in fp16, bf16 and fp32 as long as the scale is non-zero.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from nvila_quant.errors import CheckpointError, ConfigError
from nvila_quant.formats.common import (
    FLOAT_DTYPES,
    check_bits,
    check_group_size,
    check_shape,
    expect,
    take,
    take_bias,
    take_packed,
)
from nvila_quant.numerics.bitpack import as_int16_bits
from nvila_quant.numerics.qtensor import QTensor

__all__ = ["BITS", "CHUNK_ORDER", "MARKER", "NAME", "SUFFIXES", "check", "pack", "padded_groups", "quantization_config",
           "unpack"]

NAME = "tinychat"
BITS = (4,)
INTERLEAVE, KSTRIDE = 4, 64
# stored position p of each 32-wide K chunk holds input column CHUNK_ORDER[p]
CHUNK_ORDER = tuple(8 * (i % 4) + 2 * (i // 8) + (i // 4) % 2 for i in range(32))
MARKER = "qweight"
SUFFIXES = ("qweight", "scales", "scaled_zeros", "bias")


def padded_groups(n_groups: int) -> int:
    return -(-n_groups // 8) * 8


def check(bits: int, group_size: int, shape: tuple[int, int]) -> None:
    """Raise ConfigError unless a (N, K) weight with these settings can be stored in this format."""
    n, k = check_shape(NAME, shape)
    check_bits(NAME, bits, BITS)
    check_group_size(NAME, group_size, k)
    if n % INTERLEAVE or k % KSTRIDE:
        raise ConfigError(
            f"{NAME} interleaves 4 output rows over 64-wide input stripes: needs out_features % 4 == 0 and "
            f"in_features % 64 == 0, got ({n}, {k}); use autoawq or compressed-tensors for this layer"
        )


def _pack_q(q: torch.Tensor) -> torch.Tensor:
    """q: (N, K) uint8 in [0, 15] -> (N/4, K) int16."""
    n, k = q.shape
    order = torch.tensor(CHUNK_ORDER, device=q.device)
    x = q.to(torch.int64).reshape(n, k // 32, 32)[..., order]  # reorder within each 32-wide chunk
    x = x.reshape(n // INTERLEAVE, INTERLEAVE, k // KSTRIDE, KSTRIDE).transpose(1, 2)  # (N/4, K/64, 4, 64)
    x = x.reshape(n // INTERLEAVE, k // KSTRIDE, KSTRIDE, INTERLEAVE)  # regroup: 4 consecutive values per int16
    word = x[..., 0] | (x[..., 1] << 4) | (x[..., 2] << 8) | (x[..., 3] << 12)  # (N/4, K/64, 64)
    return as_int16_bits(word.reshape(n // INTERLEAVE, k))


def _unpack_q(qweight: torch.Tensor) -> torch.Tensor:
    """(N/4, K) int16 -> q (N, K) uint8."""
    n4, k = qweight.shape
    word = qweight.to(torch.int64) & 0xFFFF
    x = (word.reshape(n4, k // KSTRIDE, KSTRIDE, 1) >> torch.tensor([0, 4, 8, 12], device=word.device)) & 0xF
    x = x.reshape(n4, k // KSTRIDE, INTERLEAVE, KSTRIDE).transpose(1, 2)  # (N/4, 4, K/64, 64)
    x = x.reshape(n4 * INTERLEAVE, k // 32, 32)
    inverse = torch.tensor(sorted(range(32), key=CHUNK_ORDER.__getitem__), device=word.device)
    return x[..., inverse].reshape(n4 * INTERLEAVE, k).to(torch.uint8)


def pack(qt: QTensor) -> dict[str, torch.Tensor]:
    """QTensor -> {suffix: tensor}; the bias is added by pack_linear."""
    n, k = qt.q.shape
    check(qt.bits, qt.group_size, (n, k))
    if bool((qt.scale == 0).any()):
        raise ConfigError(f"{NAME} stores zero points as -(scale * zero), which a zero scale loses; use autoawq")
    g = qt.scale.shape[1]
    gp = padded_groups(g)
    scales = torch.zeros(gp, n, dtype=qt.scale.dtype, device=qt.scale.device)
    scaled_zeros = torch.zeros_like(scales)
    scales[:g] = qt.scale.t()
    scaled_zeros[:g] = (-(qt.scale.float() * qt.zero.float())).to(qt.scale.dtype).t()
    out = {"qweight": _pack_q(qt.q), "scales": scales, "scaled_zeros": scaled_zeros}
    return out


def unpack(
    tensors: Mapping[str, torch.Tensor], bits: int, group_size: int, symmetric: bool, module: str = "?"
) -> QTensor:
    """{suffix: tensor} -> QTensor; shapes, dtypes and the zero points' integrality are checked."""
    check_bits(NAME, bits, BITS)
    qweight = take_packed(tensors, "qweight", torch.int16, "(N/4, K)", module, NAME)
    n, k = qweight.shape[0] * INTERLEAVE, qweight.shape[1]
    try:
        check(bits, group_size, (n, k))
    except ConfigError as e:
        raise CheckpointError(f"{module}: metadata (bits={bits}, group_size={group_size}) does not fit qweight "
                              f"{tuple(qweight.shape)}: {e}") from e
    g = k // (k if group_size == -1 else group_size)
    gp = padded_groups(g)
    scales = take(tensors, "scales", module, NAME)
    expect(scales, (gp, n), FLOAT_DTYPES, f"{module}.scales (Gp, N) with {g} groups padded to {gp}")
    szeros = take(tensors, "scaled_zeros", module, NAME)
    expect(szeros, (gp, n), (scales.dtype,), f"{module}.scaled_zeros (Gp, N)")
    scale = scales[:g].t().contiguous()  # (N, G)
    if bool((scale == 0).any()):
        raise CheckpointError(f"{module}.scales has zeros: the zero points cannot be recovered from scaled_zeros")
    z = -szeros[:g].t().float() / scale.float()
    zero = torch.round(z)
    if bool(((z - zero).abs() > 0.25).any()) or bool(((zero < 0) | (zero > 2**bits - 1)).any()):
        raise CheckpointError(
            f"{module}.scaled_zeros is not -(scale * zero) with integer zero points in [0, {2**bits - 1}]"
        )
    bias = take_bias(tensors, n, module)
    return QTensor(_unpack_q(qweight), scale, zero.to(torch.int32), bits, group_size, symmetric, bias)


def quantization_config(bits: int, group_size: int, symmetric: bool, modules_to_not_convert: list[str],
                        lm_head: bool = False) -> dict:
    """AutoAWQ's key set with ``version: "gemv_fast"`` (the name AutoAWQ gives this layout). vLLM and SGLang
    do not read this layout: they would treat the checkpoint as GEMM and fail on the shapes. ``lm_head``: the head
    is packed too (``"lm_head": true``, as in AutoAWQ's GEMM config)."""
    qc = {
        "quant_method": "awq",
        "bits": bits,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemv_fast",
        "modules_to_not_convert": list(modules_to_not_convert),
    }
    if lm_head:
        qc["lm_head"] = True
    return qc
