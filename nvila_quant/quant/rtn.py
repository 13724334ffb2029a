"""Round to nearest of a float NVILA folder: a convenience front end of the quantization engine.

``write_rtn_checkpoint(src, dst, ...)`` is ``quantize(src, AWQConfig(method="rtn", ...), None, dst)`` (what
``nvila-quant rtn`` runs), in float32 on ``device`` (default the CPU): no calibration data and no vision tower are
loaded, and the LLM is read one decoder block at a time. Packability checks and the per-layer group-size fallback
(64, 32, per channel) are the engine's (:mod:`nvila_quant.quant.plan`); the output is the engine's NVILA folder
layout.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from nvila_quant.errors import ConfigError
from nvila_quant.model.config import load_config
from nvila_quant.quant.config import AWQConfig
from nvila_quant.quant.runner import quantize

__all__ = ["write_rtn_checkpoint"]


def write_rtn_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, fmt: str = "autoawq", bits: int = 4, group_size: int = 128,
    symmetric: bool = False, targets: Iterable[str] = ("llm", "projector"), scale_dtype: torch.dtype | None = None,
    device: str = "cpu", quantize_lm_head: bool = False,
) -> Path:
    """Round-to-nearest quantize a float NVILA folder's LLM decoder linears and/or projector linears.

    Writes ``dst`` with ``llm/`` and ``mm_projector/`` in ``fmt`` (per-layer group fallback where ``group_size``
    does not divide in_features), ``vision_tower/`` copied unchanged. ``group_size`` is one of
    :data:`nvila_quant.quant.config.GROUP_SIZES`. Scales, biases and float tensors keep the checkpoint's dtype;
    ``scale_dtype`` may only name that dtype. ``device``: where the rounding runs (float32 on that device).
    ``quantize_lm_head``: the output head too (:mod:`nvila_quant.quant.head`)."""
    if scale_dtype is not None and scale_dtype != load_config(src).dtype:
        raise ConfigError(
            f"scales are written in the checkpoint's dtype ({load_config(src).dtype}), got scale_dtype={scale_dtype}; "
            "pass scale_dtype=None"
        )
    config = AWQConfig(method="rtn", bits=bits, group_size=group_size, zero_point=not symmetric,
                       targets=tuple(targets), format=fmt, device=device, dtype="float32",
                       quantize_lm_head=quantize_lm_head)
    return quantize(src, config, None, dst, progress=False).output
