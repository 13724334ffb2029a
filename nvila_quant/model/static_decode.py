"""Batch-1 decode on a static KV cache, replayed from one captured CUDA graph on GPUs.

An eager decode step launches hundreds of small kernels from Python (on GPUs more time than reading the int4 weights
takes). Here the whole step (embedding, layers, lm_head, the KV write and the position bump) is captured once per
model and cache size into a CUDA graph, then replayed: one launch per token. The prompt is prefilled as before into
a ``DynamicCache``; its keys and values are copied into the static cache before decoding and the decoded ones copied
back after (:meth:`StaticDecoder.store`), so chat sessions and ``stream_gen`` keep their cache semantics. The
:class:`~nvila_quant.model.session.DecodeSession` of a model owns its decoder.

``NVILA_QUANT_DECODE`` (:class:`DecodeSettings`): "auto" (default: graphs on CUDA, the lean step of
:mod:`~nvila_quant.model.lean_decode` elsewhere, the dynamic cache where the lean step does not apply), "lean",
"graph", "compiled" (the step compiled with ``torch.compile`` first, so inductor fuses the norms, rotary embeddings
and activations between the linears, then captured on CUDA; the first decode pays the compile), "static" (static
cache, eager steps: any device), "dynamic" (always the eager dynamic-cache loop). Under "auto" a capture that fails
logs the reason and falls back to eager steps on the same static cache; "graph" and "compiled" are what the user
asked for, so there a capture or compile that fails (or "graph" off CUDA) is a :class:`DecodeError` naming why.
``NVILA_QUANT_DECODE_COMPILE_BACKEND`` (default "inductor") picks the torch.compile backend.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

from nvila_quant.errors import DecodeError
from nvila_quant.model.llm import cache_kwarg
from nvila_quant.settings import Lazy, Settings, knob

__all__ = ["BUCKET", "DECODE_MODES", "DecodeSettings", "DecoderKind", "StaticDecoder", "decode_settings",
           "decoder_kind", "static_decode_wanted"]

logger = logging.getLogger(__name__)
DECODE_MODES = ("auto", "lean", "graph", "compiled", "static", "dynamic")
BUCKET = 256  # static cache lengths are multiples of this (attention reads the whole static cache every step)


@dataclass
class DecodeSettings(Settings):
    """How batch-1 decoding runs (see the module docstring)."""

    mode: str = knob("NVILA_QUANT_DECODE", "auto", str, choices=DECODE_MODES)
    compile_backend: str = knob("NVILA_QUANT_DECODE_COMPILE_BACKEND", "inductor", str)


decode_settings = Lazy(DecodeSettings)


class StaticDecoder:
    """Single-token decode steps of ``llm`` on a static cache of ``max_len`` positions (batch 1). With
    ``graph=True`` (CUDA) a step is one CUDA graph replay; otherwise a forward on the same static cache. With
    ``compiled=True`` that forward is ``torch.compile``-d (fullgraph, static shapes) first."""

    def __init__(self, llm: torch.nn.Module, max_len: int, graph: bool, compiled: bool = False) -> None:
        self.llm, self.max_len = llm, max_len
        self.device = next(llm.parameters()).device
        self.cache = StaticCache(config=llm.config, max_cache_len=max_len)
        if not all(type(layer) is StaticLayer for layer in self.cache.layers):
            raise ValueError("static decode needs full-attention layers only (no sliding-window cache layers)")
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)  # (1, 1): the token fed this step
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=self.device)  # (1, 1): its position
        self.length = 0  # positions in the cache
        self.want_graph = graph
        self.cache_kwarg = cache_kwarg(type(llm))
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # (1, V), rewritten by every step
        self.asked = DecoderKind(graph, compiled)  # what it was built for (kept when an "auto" capture falls back)
        self.want_compile = compiled
        self.compiled = False  # whether the step is the compiled one (set by the first step)
        self._step = self._forward

    def _run(self) -> torch.Tensor:
        """One forward through the step; the first one compiles it when asked (only NVILA_QUANT_DECODE=compiled
        asks: a compile that fails is a DecodeError)."""
        if not self.want_compile or self.compiled:
            return self._step()
        backend = decode_settings().compile_backend
        try:  # torch.compile's failures (dynamo, inductor, a bad backend name) are RuntimeErrors
            step = torch.compile(self._forward, fullgraph=True, dynamic=False, backend=backend)
            out = step()
        except RuntimeError as e:
            raise DecodeError(
                f"NVILA_QUANT_DECODE=compiled: torch.compile of the decode step (backend {backend!r}) failed: "
                f"{type(e).__name__}: {e}; use NVILA_QUANT_DECODE=auto or static to decode without compiling"
            ) from e
        self._step, self.compiled = step, True
        return out

    def _forward(self) -> torch.Tensor:
        out = self.llm(input_ids=self.ids, position_ids=self.pos, use_cache=True, logits_to_keep=1,
                       **{self.cache_kwarg: self.cache})
        return out.logits[:, -1]

    @torch.inference_mode()
    def load(self, cache: DynamicCache) -> None:
        """Start from the keys and values of ``cache`` (a prefilled dynamic cache, batch 1)."""
        n = cache.get_seq_length()
        if n == 0:
            raise ValueError("static decode starts from a prefilled cache; this one holds no positions")
        if n + 1 > self.max_len:
            raise ValueError(f"{n} cached positions do not fit a static cache of {self.max_len}")
        if len(cache.layers) != len(self.cache.layers):
            raise ValueError(f"cache has {len(cache.layers)} layers, the LLM {len(self.cache.layers)}")
        for src, dst in zip(cache.layers, self.cache.layers, strict=True):
            if not dst.is_initialized:
                dst.lazy_initialization(src.keys, src.values)
            dst.keys[:, :, :n].copy_(src.keys)  # (1, H_kv, n, D)
            dst.values[:, :, :n].copy_(src.values)
            dst.cumulative_length.fill_(n)
        self.length = n
        if self.want_graph and self.graph is None:
            self._capture()

    @torch.inference_mode()
    def _capture(self) -> None:
        """Capture one step (after warm-up steps on a side stream, which also build lazy kernel state); the steps it
        runs write past ``length`` only and the cache length is restored, so the loaded prefix is untouched."""
        n = self.length
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.pos.fill_(n)
                    self._run()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self.pos.fill_(n)
            with torch.cuda.graph(graph):
                self.logits = self._step()
            self.graph = graph
        except RuntimeError as e:  # what CUDA (and a compile inside the capture) raise
            torch.cuda.synchronize(self.device)
            if decode_settings().mode in ("graph", "compiled"):  # asked for by name: no silent fallback
                raise DecodeError(f"NVILA_QUANT_DECODE={decode_settings().mode}: CUDA graph capture of the decode step "
                                  f"failed: {type(e).__name__}: {e}; NVILA_QUANT_DECODE=auto falls back to eager "
                                  "steps") from e
            logger.warning("CUDA graph capture of the decode step failed (%s); decoding with eager steps", e)
            self.want_graph, self.graph = False, None
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(n)

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed ``token`` (1, 1) long at position ``length``; return the next-token logits (1, V), valid until the
        next step."""
        if self.length + 1 > self.max_len:
            raise ValueError(f"static cache of {self.max_len} positions is full")
        self.ids.copy_(token.reshape(1, 1))
        self.pos.fill_(self.length)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.logits = self._run()
        self.length += 1
        return self.logits

    @torch.inference_mode()
    def store(self, cache: DynamicCache) -> None:
        """Write the static cache's positions back into ``cache`` (which must hold the loaded prefix)."""
        n = self.length
        for src, dst in zip(self.cache.layers, cache.layers, strict=True):
            dst.keys = src.keys[:, :, :n].clone()
            dst.values = src.values[:, :, :n].clone()
        if cache.get_seq_length() != n:
            raise RuntimeError(f"copying the static cache back gave {cache.get_seq_length()} positions, expected {n}")


class DecoderKind(NamedTuple):
    """What a session's decoder is built for: a CUDA graph, a compiled step, the lean step (else eager static)."""

    graph: bool
    compiled: bool
    lean: bool = False


def static_decode_wanted(device: torch.device) -> bool:
    """Whether decoding on ``device`` takes a decoder of its own (static, lean or graph) under ``NVILA_QUANT_DECODE``
    (the session still falls back to the dynamic cache where "auto"'s lean step does not apply)."""
    return decode_settings().mode != "dynamic"


def decoder_kind(device: torch.device) -> DecoderKind:
    """What a decoder on ``device`` is built for under the current mode."""
    mode = decode_settings().mode
    if mode == "graph" and device.type != "cuda":
        raise DecodeError(f"NVILA_QUANT_DECODE=graph replays CUDA graphs, which need a CUDA device; the model is on "
                          f"{device.type} (use lean, static, compiled, auto or dynamic)")
    cuda = device.type == "cuda"
    return DecoderKind(mode in ("auto", "graph", "compiled") and cuda, mode == "compiled",
                       mode == "lean" or (mode == "auto" and not cuda))
