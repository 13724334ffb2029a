"""ModelOpt ``W4A16_AWQ`` layout: the int4 format TensorRT-LLM's PyTorch backend loads (export only).

Tensors of a module ``<name>`` (N = out_features, K = in_features, G = group size):
    weight:          (N/2, K) int8    q - 8 in [-8, 7], packed along the OUTPUT dim: byte row i holds output row 2i
                                      in its low nibble and row 2i + 1 in its high nibble (two's complement nibbles)
    weight_scale:    (N, K/G) float   the QTensor's scale dtype, kept bit exact
    pre_quant_scale: (K,) float       activation multiplier; ones (the AWQ scales are already folded into the
                                      preceding op), in the scale dtype
    bias:            (N,) float       optional
Symmetric 4-bit weights only (no zero points: the GEMM runs with ``zeros=None``); N must be even. The
checkpoint's ``hf_quant_config.json`` comes from :func:`hf_quant_config`. Not a readable checkpoint format of this
package (not in ``checkpoint.FORMATS``): :func:`unpack` exists for round trips and checks.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from nvila_quant.errors import CheckpointError, ConfigError
from nvila_quant.formats.common import FLOAT_DTYPES, check_bits, check_group_size, check_shape, expect, take, take_bias
from nvila_quant.numerics.qtensor import QTensor

__all__ = ["BITS", "MARKER", "NAME", "QUANT_ALGO", "SUFFIXES", "SYMMETRIC_HINT", "check", "hf_quant_config", "pack",
           "unpack"]

NAME = "modelopt"
BITS = (4,)
QUANT_ALGO = "W4A16_AWQ"
MARKER = "weight_scale"  # with an int8 ``weight``, marks a quantized module
SUFFIXES = ("weight", "weight_scale", "pre_quant_scale", "bias")
SYMMETRIC_HINT = ("re-quantize symmetrically with `nvila-quant awq --no-zero-point` "
                  "(or `nvila-quant rtn --no-zero-point`)")
_OFFSET = 8  # symmetric 4-bit: signed value = q - 8


def check(bits: int, group_size: int, shape: tuple[int, int]) -> None:
    """Raise ConfigError unless a (N, K) weight with these settings can be stored in this format."""
    n, k = check_shape(NAME, shape)
    check_bits(NAME, bits, BITS)
    check_group_size(NAME, group_size, k)
    if n % 2:
        raise ConfigError(f"{NAME} packs 2 output channels per byte: out_features must be even, got {n}")


def _check_symmetric(qt: QTensor) -> None:
    if not bool((qt.zero == _OFFSET).all()):
        raise ConfigError(f"{NAME} {QUANT_ALGO} has no zero points: the weights must be symmetric (zero == 8 "
                          f"everywhere), got zero points in [{int(qt.zero.min())}, {int(qt.zero.max())}]; "
                          f"{SYMMETRIC_HINT}")


def pack(qt: QTensor) -> dict[str, torch.Tensor]:
    """QTensor -> {suffix: tensor} (``weight``, ``weight_scale``, ``pre_quant_scale``); the bias is added by the
    writer. Raises ConfigError for asymmetric weights (any zero point != 8)."""
    n, k = qt.q.shape
    check(qt.bits, qt.group_size, (n, k))
    _check_symmetric(qt)
    signed = qt.q.to(torch.int16) - _OFFSET  # (N, K) in [-8, 7]
    nibbles = (signed & 0xF).to(torch.uint8)  # two's complement low 4 bits
    packed = nibbles[0::2] | (nibbles[1::2] << 4)  # (N/2, K): even row low, odd row high
    return {
        "weight": packed.view(torch.int8).contiguous(),  # (N/2, K) int8
        "weight_scale": qt.scale.contiguous(),  # (N, K/G)
        "pre_quant_scale": torch.ones(k, dtype=qt.scale.dtype, device=qt.scale.device),  # (K,)
    }


def unpack(tensors: Mapping[str, torch.Tensor], bits: int, group_size: int, module: str = "?") -> QTensor:
    """{suffix: tensor} -> symmetric QTensor (zero 8); shapes and dtypes are checked against (bits, group_size).

    A ``pre_quant_scale`` other than ones cannot be folded into the canonical form and raises CheckpointError."""
    check_bits(NAME, bits, BITS)
    weight = take(tensors, "weight", module, NAME)
    if weight.dim() != 2 or weight.dtype not in (torch.int8, torch.uint8):
        raise CheckpointError(f"{module}.weight must be a 2-D int8 (N/2, K) tensor, got {weight.dtype} "
                              f"{tuple(weight.shape)}")
    n, k = weight.shape[0] * 2, weight.shape[1]
    try:
        g = check_group_size(NAME, group_size, k)
    except ConfigError as e:
        raise CheckpointError(f"{module}: group_size={group_size} does not fit weight {tuple(weight.shape)}: "
                              f"{e}") from e
    scale = take(tensors, "weight_scale", module, NAME)
    expect(scale, (n, k // g), FLOAT_DTYPES, f"{module}.weight_scale (N, K/G) with N={n}, K={k}, G={g}")
    pre = tensors.get("pre_quant_scale")
    if pre is not None:
        expect(pre, (k,), FLOAT_DTYPES, f"{module}.pre_quant_scale (K,) with K={k}")
        if not bool((pre == 1).all()):
            raise CheckpointError(f"{module}.pre_quant_scale is not all ones: it scales the activations and has no "
                                  "place in the canonical (q, scale, zero) form")
    bias = take_bias(tensors, n, module)
    raw = weight.view(torch.uint8)  # (N/2, K)
    nibbles = torch.stack([raw & 0xF, raw >> 4], dim=1).reshape(n, k)  # (N, K): row 2i low, row 2i + 1 high
    q = ((nibbles.to(torch.int16) ^ 0x8) & 0xF).to(torch.uint8)  # signed nibble s -> s + 8 (flip the sign bit)
    zero = torch.full((n, k // g), _OFFSET, dtype=torch.int32, device=weight.device)
    return QTensor(q.contiguous(), scale.contiguous(), zero, bits, group_size, True, bias)


def hf_quant_config(group_size: int, exclude_modules: list[str], producer_version: str) -> dict:
    """The root ``hf_quant_config.json`` TensorRT-LLM reads before any ``config.json`` quantization block."""
    return {
        "producer": {"name": "modelopt", "version": producer_version},
        "quantization": {
            "quant_algo": QUANT_ALGO,
            "group_size": group_size,
            "has_zero_point": False,
            "pre_quant_scale": True,
            "kv_cache_quant_algo": None,
            "exclude_modules": list(exclude_modules),
        },
    }
