"""Calibration conversations -> LLM inputs through the real NVILA pipeline, with a vision cache.

Each sample is tiled (dynamic S2 or dynamic), encoded by the vision tower and the projector and spliced
into the token embeddings exactly as in generation (``prepare_media`` + ``_embed``). The vision tower's
outputs are kept, so later passes (:func:`replay`: e.g. through a quantized projector, or to re-capture
the projector's inputs on resume) never run the vision tower again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from nvila_quant.calibration.samples import CalibSample
from nvila_quant.model.tokenizer import IGNORE_INDEX, tokenize_conversation

__all__ = ["CalibrationSet", "EmbeddedSample", "cached_vision", "embed_samples", "replay"]

logger = logging.getLogger(__name__)


@dataclass
class EmbeddedSample:
    """One sample's LLM inputs.

    input_ids: (T,) token ids, one media token per image (or tile); hidden: (1, T', H) inputs_embeds,
    truncated to seqlen; vision: (tiles, P, C) vision-tower output (None for text-only samples).
    """

    input_ids: torch.Tensor
    hidden: torch.Tensor
    vision: torch.Tensor | None
    kind: str
    origin: str
    block_sizes: list | None = None
    n_tiles: int = 0
    visual_tokens: int = 0
    full_length: int = 0
    labels: torch.Tensor | None = None  # (T',) next-token targets: token ids, IGNORE_INDEX at media positions

    @property
    def tokens(self) -> int:
        return int(self.hidden.shape[1])


_META_FIELDS = ("kind", "origin", "block_sizes", "n_tiles", "visual_tokens", "full_length")


@dataclass
class CalibrationSet:
    """Embedded calibration samples (+ the projector inputs of the last pass that captured them)."""

    samples: list[EmbeddedSample]
    projector_inputs: list[torch.Tensor] | None = None  # one (B, P, C_in) per image sample

    def hidden(self) -> list[torch.Tensor]:
        return [s.hidden for s in self.samples]

    def summary(self) -> dict:
        tokens = [s.tokens for s in self.samples]
        return {
            "samples": len(self.samples),
            "image_samples": sum(s.kind == "image" for s in self.samples),
            "text_samples": sum(s.kind == "text" for s in self.samples),
            "tokens": sum(tokens),
            "visual_tokens": sum(s.visual_tokens for s in self.samples),
            "tokens_per_sample": tokens,
            "truncated": sum(s.full_length > s.tokens for s in self.samples),
            "image_tiles": [s.n_tiles for s in self.samples if s.kind == "image"],
            "origins": [s.origin for s in self.samples],
        }

    # ---------------------------------------------------------------- cache
    def save(self, path: str | os.PathLike) -> None:
        """Write the samples (ids, hidden, vision features) as one safetensors file."""
        tensors, meta = {}, []
        for i, s in enumerate(self.samples):
            tensors[f"{i}.input_ids"] = s.input_ids.contiguous().cpu()
            tensors[f"{i}.hidden"] = s.hidden.contiguous().cpu()
            if s.vision is not None:
                tensors[f"{i}.vision"] = s.vision.contiguous().cpu()
            if s.labels is not None:
                tensors[f"{i}.labels"] = s.labels.contiguous().cpu()
            info = {k: getattr(s, k) for k in _META_FIELDS}
            info["block_sizes"] = [list(b) if b is not None else None for b in s.block_sizes] if s.block_sizes else None
            meta.append(info)
        tmp = Path(f"{path}.tmp")
        save_file(tensors, str(tmp), metadata={"samples": json.dumps(meta)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> CalibrationSet:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = json.loads(f.metadata()["samples"])
            keys = set(f.keys())
            samples = []
            for i, info in enumerate(meta):
                vision = f.get_tensor(f"{i}.vision") if f"{i}.vision" in keys else None
                if info.get("block_sizes"):
                    info["block_sizes"] = [tuple(b) if b is not None else None for b in info["block_sizes"]]
                labels = f.get_tensor(f"{i}.labels") if f"{i}.labels" in keys else None
                samples.append(EmbeddedSample(f.get_tensor(f"{i}.input_ids"), f.get_tensor(f"{i}.hidden"), vision,
                                              **info, labels=labels))
        return cls(samples)


@contextlib.contextmanager
def _capture(model, want_vision: bool, want_projector: bool) -> Iterator[dict[str, list]]:
    got: dict[str, list] = {"vision": [], "projector": []}
    handles = []
    if want_vision:
        handles.append(model.get_vision_tower().register_forward_hook(
            lambda m, a, out: got["vision"].append(out.detach())))
    if want_projector:
        handles.append(model.get_mm_projector().register_forward_pre_hook(
            lambda m, a: got["projector"].append(a[0].detach())))
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def cached_vision(model, features: torch.Tensor) -> Iterator[None]:
    """Make the vision tower return ``features`` (its cached output) instead of running."""
    vt = model.get_vision_tower()
    vt.forward = lambda images: features
    try:
        yield
    finally:
        del vt.forward


@torch.no_grad()
def embed_samples(
    model, samples: Sequence[CalibSample], seqlen: int, capture_projector: bool = True, progress: bool = True
) -> CalibrationSet:
    """Run every sample through tiling, vision tower, projector and embedding splice (once)."""
    out, proj_inputs = [], []
    truncated = 0
    for sample in tqdm(samples, desc="calibration: vision + embed", disable=not progress):
        conversation = sample.fresh_conversation()
        media, media_config = model.prepare_media(conversation)
        ids = tokenize_conversation(conversation, model.tokenizer)
        with _capture(model, bool(media), capture_projector and bool(media)) as got:
            embeds, labels, _ = model.embed_inputs(ids[None], media or None, media_config or None, ids[None].clone(),
                                                   None)
        vision = torch.cat(got["vision"], dim=0) if got["vision"] else None
        if got["projector"]:
            proj_inputs.append(torch.cat(got["projector"], dim=0))
        full = embeds.shape[1]
        truncated += full > seqlen
        block_sizes = (media_config or {}).get("image", {}).get("block_sizes")
        out.append(EmbeddedSample(
            ids.cpu(), embeds[:, :seqlen].contiguous(), vision, sample.kind, sample.origin,
            list(block_sizes) if block_sizes else None, len(media.get("image", [])) if media else 0,
            int((labels[0, :seqlen] == IGNORE_INDEX).sum()), full, labels[0, :seqlen].cpu(),
        ))
    if truncated:
        logger.warning("calibration: %d of %d samples are longer than seqlen=%d tokens and were truncated",
                       truncated, len(samples), seqlen)
    return CalibrationSet(out, proj_inputs if capture_projector else None)


@torch.no_grad()
def replay(model, calib: CalibrationSet, capture_projector: bool = True, progress: bool = False) -> CalibrationSet:
    """Recompute every sample's LLM inputs from the cached vision features with ``model``'s current
    projector and embeddings (the vision tower does not run). Returns a new set."""
    out, proj_inputs = [], []
    for s in tqdm(calib.samples, desc="calibration: replay", disable=not progress):
        media = media_config = None
        if s.vision is not None:
            media = {"image": [torch.zeros(0)] * s.n_tiles}
            media_config = {"image": {"block_sizes": list(s.block_sizes)}} if s.block_sizes else {}
        ctx = cached_vision(model, s.vision.to(model.device)) if s.vision is not None else contextlib.nullcontext()
        with ctx, _capture(model, False, capture_projector and media is not None) as got:
            embeds, _, _ = model.embed_inputs(s.input_ids[None], media, media_config, None, None)
        if got["projector"]:
            proj_inputs.append(torch.cat(got["projector"], dim=0))
        hidden = embeds[:, : s.tokens].contiguous()
        out.append(EmbeddedSample(s.input_ids, hidden, s.vision, s.kind, s.origin, s.block_sizes, s.n_tiles,
                                  s.visual_tokens, s.full_length, s.labels))
    return CalibrationSet(out, proj_inputs if capture_projector else None)
