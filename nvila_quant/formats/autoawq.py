"""AutoAWQ "GEMM" layout: the interchange format vLLM, SGLang, TGI, transformers and lmdeploy load as ``awq``.

Tensors of a module ``<name>`` (N = out_features, K = in_features, G = group size, K when -1):
    qweight: (K, N/8) int32    q packed along the OUTPUT dim; word j slot i holds column 8j + AWQ_ORDER[i]
    qzeros:  (K/G, N/8) int32  zero points, same packing (2^(b-1) = 8 for symmetric weights)
    scales:  (K/G, N) float    the QTensor's scale dtype, kept bit exact (AutoAWQ itself writes fp16)
    bias:    (N,) float        optional
Only 4-bit weights exist in this format; N must be a multiple of 8.
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
from nvila_quant.numerics.bitpack import pack_int32, unpack_int32
from nvila_quant.numerics.qtensor import QTensor

__all__ = ["AWQ_ORDER", "BITS", "MARKER", "NAME", "SUFFIXES", "check", "pack", "quantization_config", "unpack"]

NAME = "autoawq"
BITS = (4,)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # slot i of a word holds output column 8j + AWQ_ORDER[i]
MARKER = "qweight"  # the tensor whose presence marks a quantized module
SUFFIXES = ("qweight", "qzeros", "scales", "bias")


def check(bits: int, group_size: int, shape: tuple[int, int]) -> None:
    """Raise ConfigError unless a (N, K) weight with these settings can be stored in this format."""
    n, k = check_shape(NAME, shape)
    check_bits(NAME, bits, BITS)
    check_group_size(NAME, group_size, k)
    if n % 8:
        raise ConfigError(f"{NAME} packs 8 output channels per int32: out_features must be a multiple of 8, got {n}")


def pack(qt: QTensor) -> dict[str, torch.Tensor]:
    """QTensor -> {suffix: tensor} (module-relative names, e.g. ``"qweight"``); the bias is added by pack_linear."""
    check(qt.bits, qt.group_size, tuple(qt.q.shape))
    out = {
        "qweight": pack_int32(qt.q.t(), qt.bits, AWQ_ORDER),  # (K, N) -> (K, N/8)
        "qzeros": pack_int32(qt.zero.t(), qt.bits, AWQ_ORDER),  # (K/G, N) -> (K/G, N/8)
        "scales": qt.scale.t().contiguous(),  # (K/G, N)
    }
    return out


def unpack(
    tensors: Mapping[str, torch.Tensor], bits: int, group_size: int, symmetric: bool, module: str = "?"
) -> QTensor:
    """{suffix: tensor} -> QTensor; shapes and dtypes are checked against (bits, group_size)."""
    check_bits(NAME, bits, BITS)
    qweight = take_packed(tensors, "qweight", torch.int32, "(K, N/8)", module, NAME)
    k, n = qweight.shape[0], qweight.shape[1] * 8
    try:
        g = check_group_size(NAME, group_size, k)
    except ConfigError as e:
        raise CheckpointError(f"{module}: metadata group_size={group_size} does not fit qweight "
                              f"{tuple(qweight.shape)}: {e}") from e
    scales = take(tensors, "scales", module, NAME)
    expect(scales, (k // g, n), FLOAT_DTYPES, f"{module}.scales (K/G, N) with K={k}, G={g}")
    if "qzeros" in tensors:
        qzeros = tensors["qzeros"]
        expect(qzeros, (k // g, n // 8), (torch.int32,), f"{module}.qzeros (K/G, N/8) with K={k}, G={g}")
        zero = unpack_int32(qzeros, bits, n, AWQ_ORDER).t().to(torch.int32)
    elif symmetric:
        zero = torch.full((n, k // g), 2 ** (bits - 1), dtype=torch.int32, device=qweight.device)
    else:
        raise CheckpointError(f"{module} lacks 'qzeros', which asymmetric (zero_point=true) AWQ weights need")
    bias = take_bias(tensors, n, module)
    q = unpack_int32(qweight, bits, n, AWQ_ORDER).t().contiguous()  # (N, K)
    return QTensor(q, scales.t().contiguous(), zero.contiguous(), bits, group_size, symmetric, bias)


def quantization_config(bits: int, group_size: int, symmetric: bool, modules_to_not_convert: list[str],
                        lm_head: bool = False) -> dict:
    """The standard ``quantization_config`` (zero_point stays true: symmetric weights store qzeros = 8).
    ``lm_head``: the head is packed too; vLLM and SGLang quantize it only when the config says ``"lm_head": true``."""
    qc = {
        "quant_method": "awq",
        "bits": bits,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": list(modules_to_not_convert),
    }
    if lm_head:
        qc["lm_head"] = True
    return qc
