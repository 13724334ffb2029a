"""Which linears get quantized, and how: packability per layer with group-size fallback, checked up front.

Built from meta modules (shapes only; no weights are read), so bad settings fail before any long work:
bits the format cannot pack, or a group size that divides no target layer's input width. A layer the
configured group size does not fit falls back to 64, 32, then per channel (-1), with a warning; a layer
no setting can pack stays in float. With ``quantize_lm_head`` the output head is planned the same way, at the rows it
will have (:func:`nvila_quant.quant.head.head_rows`: the runtime vocabulary padded to a multiple of 64).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from nvila_quant.errors import ConfigError
from nvila_quant.formats.checkpoint import check_packable, format_module
from nvila_quant.model.config import NVILAConfig
from nvila_quant.model.layout import runtime_tokenizer
from nvila_quant.model.projector import MultimodalProjector
from nvila_quant.quant.awq import QuantArgs
from nvila_quant.quant.config import AWQConfig
from nvila_quant.quant.head import head_rows
from nvila_quant.quant.lazy import LLMBlocks
from nvila_quant.quant.mappings import block_linears

__all__ = ["FALLBACK_GROUPS", "LayerPlan", "meta_projector", "plan_layers"]

FALLBACK_GROUPS = (64, 32)


@dataclass
class LayerPlan:
    """Quantizer per target linear (None: kept in float), names relative to a block / the projector; the output
    head's (None: float, or not asked for) and the rows it is quantized with."""

    llm: dict[str, QuantArgs | None] = field(default_factory=dict)
    projector: dict[str, QuantArgs | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    lm_head: QuantArgs | None = None
    lm_head_rows: int | None = None

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            part: {n: (None if q is None else q.group_size) for n, q in plan.items()}
            for part, plan in (("llm", self.llm), ("projector", self.projector))
        }
        if self.lm_head_rows is not None:
            out["lm_head"] = None if self.lm_head is None else self.lm_head.group_size
        return out


def _choose_group(config: AWQConfig, shape: tuple[int, int], name: str, notes: list[str]) -> QuantArgs | None:
    """The configured group size, else a smaller divisor, else per channel; None when nothing packs."""
    g0 = config.group_size
    candidates = [g0] if g0 == -1 else [g0, *(g for g in FALLBACK_GROUPS if g < g0), -1]
    errors = []
    for g in candidates:
        try:
            check_packable(config.format, config.bits, g, shape)
        except ConfigError as e:
            errors.append(str(e))
            continue
        if g != g0:
            notes.append(f"{name} {tuple(shape)}: group size {g0} does not fit ({errors[0]}); using "
                         f"{'per-channel (-1)' if g == -1 else g}")
        return QuantArgs(config.bits, g, config.zero_point)
    notes.append(f"{name} {tuple(shape)}: cannot be packed in {config.format} ({errors[-1]}); kept in float")
    return None


def plan_layers(nv_config: NVILAConfig, config: AWQConfig) -> LayerPlan:
    """Check bits/format and every target linear's shape (from meta modules; no weights are read)."""
    fmt = format_module(config.format)
    if config.bits not in fmt.BITS:
        served = [f for f in ("compressed-tensors",) if config.bits in format_module(f).BITS]
        raise ConfigError(
            f"format {config.format} packs only {list(fmt.BITS)}-bit weights, got --w-bit {config.bits}"
            + (f"; use --format {served[0]}" if served else "")
        )
    plan = LayerPlan()
    shapes: dict[str, tuple[int, int]] = {}
    if "llm" in config.targets:
        block = LLMBlocks.from_folder(nv_config.part("llm")).meta_block(0)
        for name in block_linears(block):
            shapes[f"llm:{name}"] = tuple(block.get_submodule(name).weight.shape)
    if "projector" in config.targets:
        with torch.device("meta"):
            projector = meta_projector(nv_config)
        for name in block_linears(projector):
            shapes[f"projector:{name}"] = tuple(projector.get_submodule(name).weight.shape)
    if not shapes and "vision_tower" not in config.targets:
        raise ConfigError(f"the targets {list(config.targets)} hold no Linear layers to quantize")
    g = config.group_size
    if shapes and g != -1 and not any(k % g == 0 for _, k in shapes.values()):
        widths = sorted({k for _, k in shapes.values()})
        raise ConfigError(
            f"group size {g} divides the input width of none of the {len(shapes)} target linears "
            f"(in_features: {widths}); choose a group size that divides them, or -1 (per channel)"
        )
    for key, shape in shapes.items():
        part, name = key.split(":", 1)
        getattr(plan, part)[name] = _choose_group(config, shape, f"{part} {name}", plan.notes)
    if config.quantize_lm_head:
        llm_cfg = nv_config.part("llm").read_config()
        plan.lm_head_rows = head_rows(llm_cfg.get("vocab_size") or 0, len(runtime_tokenizer(nv_config)))
        plan.lm_head = _choose_group(config, (plan.lm_head_rows, int(llm_cfg["hidden_size"])), "llm lm_head",
                                     plan.notes)
    return plan


def meta_projector(nv_config: NVILAConfig) -> MultimodalProjector:
    mp_cfg = nv_config.part("mm_projector").read_config()
    ptype = mp_cfg.get("mm_projector_type") or (nv_config.mm_projector_cfg or {}).get("mm_projector_type")
    vt_cfg = nv_config.part("vision_tower").read_config()
    vt_hidden = vt_cfg.get("hidden_size") or vt_cfg.get("vision_config", {}).get("hidden_size")
    mm_hidden = nv_config.mm_hidden_size or vt_hidden * (len(nv_config.s2_scales) if nv_config.is_dynamic_s2 else 1)
    return MultimodalProjector(ptype, mm_hidden, nv_config.hidden_size or nv_config.llm_cfg["hidden_size"])
