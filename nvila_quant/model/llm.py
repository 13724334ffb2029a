"""Calls into the transformers causal LM that hold across the supported transformers versions (5.17-5.24).

transformers >= 5.2x names the forward's cache argument ``cache``, earlier 5.x ``past_key_values``: the name is read
from the forward's signature once per class.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator

import torch
from transformers import DynamicCache
from transformers import logging as hf_logging

__all__ = ["cache_kwarg", "llm_forward", "make_cache", "quiet_transformers"]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load-time warnings (the loaders check missing/mismatched keys themselves)."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


@functools.lru_cache(maxsize=16)
def cache_kwarg(forward_cls: type) -> str:
    """The name under which ``forward_cls.forward`` takes the KV cache: ``cache`` or ``past_key_values``."""
    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def make_cache(llm: torch.nn.Module) -> DynamicCache:
    """An empty dynamic KV cache for ``llm``."""
    try:
        return DynamicCache(config=llm.config)
    except TypeError:  # older signature
        return DynamicCache()


def llm_forward(
    llm: torch.nn.Module,
    inputs_embeds: torch.Tensor,
    cache: DynamicCache,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    logits_to_keep: int = 0,
) -> torch.Tensor:
    """One causal-LM forward over ``inputs_embeds`` (B, T, H) that appends to ``cache``; logits (B, T', V)."""
    out = llm(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=logits_to_keep,
        **{cache_kwarg(type(llm)): cache},
    )
    return out.logits


def mean_row(weight: torch.Tensor, round_to: torch.dtype) -> torch.Tensor:
    """The mean of an embedding / head matrix's rows (1, H): the value NVILA gives the rows of tokens it adds
    (media tokens), computed in fp32 and rounded to the checkpoint's dtype ``round_to``, so a model loaded in
    another dtype and a checkpoint written with the rows already grown hold the same values."""
    return weight.float().mean(0, keepdim=True).to(round_to).to(weight.dtype)


def grow_rows(weight: torch.Tensor, rows: int, round_to: torch.dtype) -> torch.Tensor:
    """``weight`` grown to ``rows`` rows with :func:`mean_row` (unchanged when it has as many already)."""
    old = weight.shape[0]
    if rows <= old:
        return weight
    return torch.cat([weight, mean_row(weight, round_to).expand(rows - old, *weight.shape[1:])])

