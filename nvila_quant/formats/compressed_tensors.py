"""compressed-tensors "pack-quantized" layout (llm-compressor output; vLLM and SGLang load it).

Tensors of a module ``<name>`` (N = out_features, K = in_features, G = group size, K when -1, b = bits):
    weight_packed:     (N, ceil(K*b/32)) int32   packed along the INPUT dim, value = q_signed + 2^(b-1)
    weight_scale:      (N, K/G) float            the QTensor's scale dtype
    weight_zero_point: (ceil(N*b/32), K/G) int32 asymmetric only; zp_signed + 2^(b-1) packed along dim 0
    weight_shape:      (2,) int64              [N, K] (what ``torch.tensor(weight.shape)`` gives upstream)
    bias:              (N,) float              optional
Packing is compressed-tensors' dense one (no padding bits; values cross word boundaries when b does not divide
32; for b = 4 and 8 it is the plain sequential 8 / 4 values per word). Stored values are the canonical unsigned
q and z (signed value + offset), so (q - z) * s is unchanged.
Any bits in 1..8 and any N, K pack; vLLM/SGLang serve 4 and 8 bits (the upstream compressor's set).
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
    symmetric_zero,
    take,
    take_bias,
)
from nvila_quant.numerics.bitpack import dense_word_count, pack_dense_int32, unpack_dense_int32
from nvila_quant.numerics.qtensor import QTensor

__all__ = ["BITS", "INT8_FORMAT", "MARKER", "NAME", "SERVED_BITS", "SUFFIXES", "check", "check_int8_config",
           "int8_quantization_config", "pack", "quantization_config", "unpack", "weights_args"]

NAME = "compressed-tensors"
BITS = tuple(range(1, 9))
SERVED_BITS = (4, 8)
MARKER = "weight_packed"
SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "bias")
_INT_DTYPES = (torch.int32, torch.int64)


def check(bits: int, group_size: int, shape: tuple[int, int]) -> None:
    """Raise ConfigError unless a (N, K) weight with these settings can be stored in this format."""
    _, k = check_shape(NAME, shape)
    check_bits(NAME, bits, BITS)
    check_group_size(NAME, group_size, k)


def pack(qt: QTensor) -> dict[str, torch.Tensor]:
    """QTensor -> {suffix: tensor}; the bias is added by pack_linear."""
    n, k = qt.q.shape
    check(qt.bits, qt.group_size, (n, k))
    out = {
        "weight_packed": pack_dense_int32(qt.q, qt.bits),  # (N, ceil(K*b/32))
        "weight_scale": qt.scale.contiguous(),  # (N, K/G)
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if qt.symmetric:
        symmetric_zero(NAME, qt.zero, qt.bits)
    else:
        out["weight_zero_point"] = pack_dense_int32(qt.zero.t(), qt.bits).t().contiguous()  # (ceil(N*b/32), K/G)
    return out


def unpack(
    tensors: Mapping[str, torch.Tensor], bits: int, group_size: int, symmetric: bool, module: str = "?"
) -> QTensor:
    """{suffix: tensor} -> QTensor; shapes and dtypes are checked against (bits, group_size)."""
    check_bits(NAME, bits, BITS)
    shape = take(tensors, "weight_shape", module, NAME)
    if shape.numel() != 2 or shape.dtype not in _INT_DTYPES:
        raise CheckpointError(f"{module}.weight_shape must hold [out_features, in_features], got {shape.tolist()}")
    n, k = (int(v) for v in shape.tolist())
    try:
        g = check_group_size(NAME, group_size, k)
    except ConfigError as e:
        raise CheckpointError(f"{module}: metadata group_size={group_size} does not fit weight_shape "
                              f"{[n, k]}: {e}") from e
    packed = take(tensors, "weight_packed", module, NAME)
    expect(packed, (n, dense_word_count(k, bits)), (torch.int32,),
           f"{module}.weight_packed (N, ceil(K*{bits}/32)) for weight_shape {[n, k]}")
    scale = take(tensors, "weight_scale", module, NAME)
    expect(scale, (n, k // g), FLOAT_DTYPES, f"{module}.weight_scale (N, K/G) with G={g}")
    if "weight_zero_point" in tensors:
        zp = tensors["weight_zero_point"]
        expect(zp, (dense_word_count(n, bits), k // g), (torch.int32,),
               f"{module}.weight_zero_point (ceil(N*{bits}/32), K/G)")
        zero = unpack_dense_int32(zp.t().contiguous(), bits, n).t().to(torch.int32)
    elif symmetric:
        zero = torch.full((n, k // g), 2 ** (bits - 1), dtype=torch.int32, device=packed.device)
    else:
        raise CheckpointError(f"{module} lacks 'weight_zero_point', which asymmetric weights need")
    bias = take_bias(tensors, n, module)
    q = unpack_dense_int32(packed, bits, k)
    return QTensor(q, scale.contiguous(), zero.contiguous(), bits, group_size, symmetric, bias)


def weights_args(bits: int, group_size: int, symmetric: bool) -> dict:
    """One ``config_groups.<group>.weights`` entry."""
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "group_size": None if group_size == -1 else group_size,
        "strategy": "channel" if group_size == -1 else "group",
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def quantization_config(
    bits: int, group_size: int, symmetric: bool, modules_to_not_convert: list[str],
    overrides: Mapping[str, int] | None = None, lm_head: bool = False,
) -> dict:
    """``quantization_config`` for config.json. ``group_0`` targets every Linear; each per-module group-size
    override becomes its own group whose targets are exact module names (exact names win over class names).
    ``lm_head``: the head is packed too; it is named in group_0's targets (unless an override names it), since an
    engine's head is not a ``Linear`` by class (vLLM's ``ParallelLMHead``) and is matched by name."""
    targets = ["Linear", "lm_head"] if lm_head and "lm_head" not in (overrides or {}) else ["Linear"]
    groups: dict[str, dict] = {
        "group_0": {"targets": targets, "weights": weights_args(bits, group_size, symmetric),
                    "input_activations": None, "output_activations": None, "format": "pack-quantized"},
    }
    by_size: dict[int, list[str]] = {}
    for name, g in sorted((overrides or {}).items()):
        by_size.setdefault(g, []).append(name)
    for i, (g, names) in enumerate(sorted(by_size.items()), start=1):
        groups[f"group_{i}"] = {"targets": names, "weights": weights_args(bits, g, symmetric),
                                "input_activations": None, "output_activations": None, "format": "pack-quantized"}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": list(modules_to_not_convert),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }


# ---- W8A8 (the vision tower): "int-quantized", int8 weights per channel, dynamic int8 activations per token ----
# Tensors of a module: weight (N, K) int8, weight_scale (N, 1) float, bias (N,) float.
INT8_FORMAT = "int-quantized"
_INT8_WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
_INT8_INPUTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def int8_quantization_config(ignore: list[str]) -> dict:
    """``quantization_config`` of a W8A8 (dynamic per-token activations) model; ``ignore``: Linear modules kept
    float (full names)."""
    weights = {**weights_args(8, -1, True), **_INT8_WEIGHTS}
    inputs = {**_INT8_INPUTS, "group_size": None, "actorder": None, "block_structure": None, "observer": None,
              "observer_kwargs": {}}
    return {
        "quant_method": "compressed-tensors",
        "format": INT8_FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs,
                                      "output_activations": None, "format": INT8_FORMAT}},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }


def check_int8_config(qc: Mapping, where: object) -> list[str]:
    """The ``ignore`` list of a W8A8 ``quantization_config``; CheckpointError for anything but the scheme
    :func:`int8_quantization_config` writes (which the runtime's int8 linears compute)."""
    if qc.get("quant_method") != "compressed-tensors" or qc.get("format") != INT8_FORMAT:
        raise CheckpointError(f"{where}: quantization_config is {qc.get('quant_method')!r} / {qc.get('format')!r}; "
                              f"a quantized vision tower must be compressed-tensors {INT8_FORMAT!r} (W8A8)")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise CheckpointError(f"{where}: expected one config group (W8A8 on every Linear), got {sorted(groups)}")
    (group,) = groups.values()
    for part, want in (("weights", _INT8_WEIGHTS), ("input_activations", _INT8_INPUTS)):
        got = group.get(part) or {}
        bad = {k: got.get(k) for k, v in want.items() if got.get(k) != v}
        if bad:
            raise CheckpointError(f"{where}: config_groups {part} has {bad}, expected {want} (int8 weights per "
                                  "channel, dynamic int8 activations per token)")
    if group.get("targets") != ["Linear"]:
        raise CheckpointError(f"{where}: config group targets {group.get('targets')}, expected ['Linear']")
    return list(qc.get("ignore") or [])
