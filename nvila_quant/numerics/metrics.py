"""Next-token and tensor comparison metrics as pure functions (tensors in, tensors or floats out).

Shared by the AWQ engine's accuracy check (:mod:`nvila_quant.quant.evaluate`) and ``nvila-quant compare``
(:mod:`nvila_quant.report.accuracy`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["cosine", "first_divergence", "kl_divergence", "max_abs", "nll", "perplexity", "top1_agreement"]


def kl_divergence(ref_logits: torch.Tensor, cand_logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(P_ref || P_cand) in nats. logits: (T, V), (T, V') -> (T,), computed in float32.

    The candidate may have more vocabulary rows than the reference (V' > V: a head padded to a multiple of 64): the
    reference gives those tokens probability 0, so they count only through the candidate's normalization."""
    if cand_logits.shape[-1] < ref_logits.shape[-1]:
        raise ValueError(f"the candidate has fewer vocabulary rows than the reference "
                         f"({cand_logits.shape[-1]} vs {ref_logits.shape[-1]})")
    ref = F.log_softmax(ref_logits.float(), dim=-1)
    cand = F.log_softmax(cand_logits.float(), dim=-1)[..., : ref.shape[-1]]
    return (ref.exp() * (ref - cand)).sum(-1).clamp(min=0)


def top1_agreement(ref_logits: torch.Tensor, cand_logits: torch.Tensor) -> torch.Tensor:
    """Per-position 1.0 where both argmaxes agree. (T, V) -> (T,)."""
    return (ref_logits.argmax(-1) == cand_logits.argmax(-1)).float()


def nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood of ``targets`` (T,) under ``logits`` (T, V)."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def perplexity(total_nll: float, n_tokens: int) -> float:
    return math.exp(total_nll / max(n_tokens, 1))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-row cosine similarity of two (N, C) tensors."""
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token of two generations, or None when identical."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
