"""Accuracy of a quantized NVILA folder against its float model, through dequantized ("fake quant") weights.

:func:`load_dequantized` loads a folder (any of the packed formats, or float) with the quantized runtime and puts
every QuantLinear on the "reference" backend: F.linear with the exactly dequantized weight (fp32 (q - z) * s,
cast to the activation dtype), i.e. what the packed checkpoint computes, up to kernel rounding.
:func:`next_token_metrics` compares next-token distributions on the same embedded conversations.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from nvila_quant.calibration import CalibrationSet, replay
from nvila_quant.model import NVILAQwen2
from nvila_quant.model.quantized import set_backend
from nvila_quant.model.tokenizer import IGNORE_INDEX
from nvila_quant.numerics import metrics

__all__ = ["llm_logits", "load_dequantized", "next_token_metrics"]


def load_dequantized(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> NVILAQwen2:
    """An NVILA folder loaded by the quantized runtime, every QuantLinear on the "reference" backend."""
    model = NVILAQwen2.load_pretrained(path, torch_dtype=dtype, device=device)
    set_backend(model, "reference")
    return model


@torch.no_grad()
def llm_logits(model: NVILAQwen2, calib: CalibrationSet) -> list[torch.Tensor]:
    """Logits (T', V) of every sample, with ``model``'s own projector (vision features from the cache)."""
    own = replay(model, calib, capture_projector=False)
    return [model.get_llm()(inputs_embeds=s.hidden).logits[0].float() for s in own.samples]


def next_token_metrics(
    ref_logits: Sequence[torch.Tensor], test_logits: Sequence[torch.Tensor], calib: CalibrationSet
) -> dict[str, float]:
    """KL(P_ref || P_test), top-1 agreement and both perplexities at positions that predict a text token."""
    kl_sum, agree, nll_ref, nll_test, n = 0.0, 0.0, 0.0, 0.0, 0
    for ref, test, s in zip(ref_logits, test_logits, calib.samples, strict=True):
        targets = s.labels[1:].to(ref.device)
        keep = targets != IGNORE_INDEX
        r, t, y = ref[:-1][keep], test[:-1][keep], targets[keep]  # (K, V), (K, V), (K,)
        kl_sum += float(metrics.kl_divergence(r, t).sum())
        agree += float(metrics.top1_agreement(r, t).sum())
        nll_ref += float(metrics.nll(r, y).sum())
        nll_test += float(metrics.nll(t, y).sum())
        n += int(keep.sum())
    return {"kl": kl_sum / max(n, 1), "top1": agree / max(n, 1), "ppl_ref": metrics.perplexity(nll_ref, n),
            "ppl": metrics.perplexity(nll_test, n), "tokens": max(n, 1)}
