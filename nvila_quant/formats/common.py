"""Checks shared by the on-disk formats (expected-vs-got errors)."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch

from nvila_quant.errors import CheckpointError, ConfigError

__all__ = [
    "FLOAT_DTYPES",
    "check_bits",
    "check_group_size",
    "check_shape",
    "expect",
    "symmetric_zero",
    "take",
    "take_bias",
    "take_packed",
]


def check_group_size(fmt: str, group_size: int, in_features: int) -> int:
    """Validate a group size for (·, in_features); return the effective group (K when -1)."""
    if group_size == -1:
        return in_features
    if group_size <= 0:
        raise ConfigError(f"{fmt}: group_size must be -1 (per channel) or a positive divisor of in_features, "
                          f"got {group_size}")
    if in_features % group_size:
        raise ConfigError(
            f"{fmt}: group_size must divide in_features (got in_features={in_features}, group_size={group_size}); "
            "use a divisor of in_features or -1 (per channel) for this layer"
        )
    return group_size


def check_bits(fmt: str, bits: int, allowed: Collection[int]) -> None:
    if bits not in allowed:
        raise ConfigError(f"{fmt} packs only {sorted(allowed)}-bit weights, got bits={bits}")


def check_shape(fmt: str, shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) <= 0:
        raise ConfigError(f"{fmt}: expected a (out_features, in_features) shape with positive sizes, "
                          f"got {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def symmetric_zero(fmt: str, zero: torch.Tensor, bits: int) -> None:
    """Symmetric weights must carry the canonical zero point 2^(bits-1) everywhere."""
    if not bool((zero == 2 ** (bits - 1)).all()):
        raise ValueError(f"{fmt}: a symmetric QTensor must have zero == {2 ** (bits - 1)} everywhere")


def take(tensors: Mapping[str, torch.Tensor], key: str, module: str, fmt: str) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"{fmt} module {module!r} lacks tensor {key!r} (has {sorted(tensors)})")
    return tensors[key]


def take_packed(
    tensors: Mapping[str, torch.Tensor], key: str, dtype: torch.dtype, layout: str, module: str, fmt: str
) -> torch.Tensor:
    """The module's 2-D integer tensor ``key`` of ``dtype`` (``layout`` names its dims in the error)."""
    t = take(tensors, key, module, fmt)
    if t.dim() != 2 or t.dtype != dtype:
        raise CheckpointError(f"{module}.{key} must be a 2-D {str(dtype).removeprefix('torch.')} {layout} tensor, "
                              f"got {t.dtype} {tuple(t.shape)}")
    return t


def take_bias(tensors: Mapping[str, torch.Tensor], n: int, module: str) -> torch.Tensor | None:
    """The module's optional ``bias`` (N,) float tensor, checked when present."""
    bias = tensors.get("bias")
    if bias is not None:
        expect(bias, (n,), FLOAT_DTYPES, f"{module}.bias")
    return bias


def expect(t: torch.Tensor, shape: tuple[int, ...], dtypes: Collection[torch.dtype], what: str) -> None:
    """Raise CheckpointError unless ``t`` has ``shape`` and one of ``dtypes``."""
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{what} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype not in dtypes:
        raise CheckpointError(f"{what} has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
