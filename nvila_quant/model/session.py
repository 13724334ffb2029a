"""The decode state of a model: one owner for the KV cache, its attention mask and the static / CUDA-graph decoder.

A :class:`DecodeSession` belongs to one causal LM (an NVILA model creates its own in ``init_vlm``:
``model.decode_session``). Everything that prefills or decodes over kept state goes through it: ``stream_gen``
(:meth:`DecodeSession.extend`), chat sessions and ``generate_content`` (:meth:`DecodeSession.decoding`) and the
timing of ``benchmark`` / ``compare``. Nothing else holds or writes the cache.

    session.reset()                                   forget the sequence (the static decoder is kept)
    logits = session.extend(embeds, mask, start_pos)  prefill / continue at start_pos (crops a longer cache)
    with session.decoding(steps) as step:             one token per call at the end of the sequence; on a GPU
        logits = step(token)                          a CUDA graph replay, the cache taking the positions back
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import DynamicCache

from nvila_quant.errors import DecodeError
from nvila_quant.model.lean_decode import LeanDecoder, lean_refusal
from nvila_quant.model.llm import llm_forward, make_cache
from nvila_quant.model.static_decode import (
    BUCKET,
    StaticDecoder,
    decode_settings,
    decoder_kind,
    static_decode_wanted,
)

__all__ = ["DecodeSession"]

logger = logging.getLogger(__name__)


class DecodeSession:
    """KV cache (a transformers ``DynamicCache``), the mask over its positions (B, T) bool, and the static decoder
    (kept across sequences: its CUDA graph is captured once per cache size)."""

    def __init__(self, llm: torch.nn.Module) -> None:
        self.llm = llm
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, T) bool: which cached positions are real tokens
        self.static: StaticDecoder | LeanDecoder | None = None

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def length(self) -> int:
        """Positions in the cache (0 when no sequence is held)."""
        return 0 if self.mask is None else int(self.mask.shape[1])

    def reset(self) -> None:
        """Forget the cached sequence (the static decoder stays for the next one)."""
        self.cache, self.mask = None, None

    @torch.inference_mode()
    def extend(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        start_pos: int = 0,
        chunk_prefilling: bool = False,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Run ``embeds`` (B, T, H) with ``mask`` (B, T) bool at position ``start_pos`` over the cached sequence.

        ``start_pos == 0`` starts a new sequence (fresh cache). ``start_pos > 0`` continues the cached one (cropped
        back to ``start_pos`` if it is longer): one position is a decode step; several (a new chat turn) need
        ``chunk_prefilling=True``. Returns logits (B, T, V), the last ``logits_to_keep`` positions when > 0.
        """
        n_new = embeds.shape[1]
        if start_pos == 0:
            cache, past_mask = make_cache(self.llm), mask[:, :0]
        else:
            cache, past_mask = self.cache, self.mask
            if cache is None or past_mask is None:
                raise ValueError(f"stream_gen got start_pos={start_pos} but no sequence is cached; "
                                 "start at start_pos=0")
            cached = cache.get_seq_length()
            if start_pos > cached:
                raise ValueError(f"stream_gen start_pos={start_pos} is past the {cached} cached positions")
            if n_new > 1 and not chunk_prefilling:
                raise ValueError(
                    f"stream_gen got {n_new} new positions at start_pos={start_pos}: continuing a cached sequence "
                    "with more than one token needs chunk_prefilling=True"
                )
            if past_mask.shape[0] != mask.shape[0]:
                raise ValueError(
                    f"batch size changed from {past_mask.shape[0]} to {mask.shape[0]} within a cached sequence"
                )
            if start_pos < cached:
                cache.crop(start_pos - cached)  # negative: drop that many trailing positions
            past_mask = past_mask[:, :start_pos]
        full_mask = torch.cat([past_mask, mask], dim=1)
        position_ids = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n_new:]
        attn = None if bool(full_mask.all()) else full_mask.long()
        logits = llm_forward(self.llm, embeds, cache, attn, position_ids, logits_to_keep)
        self.cache, self.mask = cache, full_mask
        return logits

    def static_decoder(self, needed: int) -> StaticDecoder | LeanDecoder | None:
        """The decoder with room for ``needed`` positions (built or re-sized on demand): the lean step, a static
        cache (eager, compiled or a CUDA graph), or None where the dynamic-cache loop runs (``NVILA_QUANT_DECODE``,
        device, batch, padding, cache layout, a model the lean step does not cover under "auto")."""
        device = self.device
        if not static_decode_wanted(device):
            return None
        if self.mask is not None and (self.mask.shape[0] != 1 or not bool(self.mask.all())):
            return None  # batched or padded: positions are not cache indices
        kind = decoder_kind(device)
        decoder = self.static
        if decoder is not None and decoder.max_len >= needed and decoder.asked == kind:
            return decoder
        max_len = -(-needed // BUCKET) * BUCKET
        if decoder is not None and decoder.asked == kind:
            max_len = max(max_len, 2 * decoder.max_len)  # the same kind grows geometrically: few re-captures
        self.static = None  # free the old one first
        if kind.lean:
            why = lean_refusal(self.llm)
            if why is None:
                self.static = LeanDecoder(self.llm, max_len, kind)
                return self.static
            if decode_settings().mode == "lean":  # asked for by name: no silent fallback
                raise DecodeError(f"NVILA_QUANT_DECODE=lean does not apply to this model: {why}; use auto, static or "
                                  "dynamic")
            logger.info("lean decode step does not apply (%s); decoding with the dynamic cache", why)
            return None
        try:
            self.static = StaticDecoder(self.llm, max_len, kind.graph, kind.compiled)
        except ValueError as e:
            logger.warning("static decode unavailable (%s); decoding with the dynamic cache", e)
            return None
        return self.static

    @contextmanager
    def decoding(self, steps: int) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """Decode steps at the end of the cached sequence: ``step(token (B, 1) long) -> next-token logits (B, V)``.

        ``steps`` is how many steps the caller may run (0: it may run some, but too few to pay for a static decoder).
        Where the static decoder applies the steps run on it (a CUDA graph replay each on GPUs) and the cache and mask
        take its positions back when the block ends; otherwise each step is a forward on the dynamic cache.
        """
        if self.cache is None or self.mask is None:
            raise ValueError("decoding needs a prefilled sequence; call extend() first")
        decoder = self.static_decoder(self.length + steps) if steps > 0 else None
        if decoder is None:
            embed = self.llm.get_input_embeddings()

            @torch.inference_mode()
            def step(token: torch.Tensor) -> torch.Tensor:
                token = token.to(self.device)
                ones = torch.ones(token.shape, dtype=torch.bool, device=self.device)
                return self.extend(embed(token), ones, self.length, logits_to_keep=1)[:, -1]

            yield step
            return
        decoder.load(self.cache)
        try:
            yield decoder.step
        finally:
            fed = decoder.length - self.length
            if fed > 0:  # hand the cache back
                decoder.store(self.cache)
                self.mask = torch.cat([self.mask, self.mask.new_ones(1, fed)], dim=1)
