"""Accuracy of a quantized NVILA folder against its float model, through dequantized ("fake quant") weights.

:class:`DequantizedNVILA` loads a quantized folder (any of the packed formats) as a float NVILA whose
linears hold the dequantized weights: what the packed checkpoint computes, up to kernel rounding.
:func:`next_token_metrics` compares next-token distributions on the same embedded conversations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from nvila_quant.calibration import CalibrationSet, replay
from nvila_quant.errors import CheckpointError
from nvila_quant.formats.checkpoint import read_quantized_submodel
from nvila_quant.io import read_json
from nvila_quant.model import NVILAQwen2
from nvila_quant.model.nvila import load_llm
from nvila_quant.model.projector import MultimodalProjector
from nvila_quant.model.tokenizer import IGNORE_INDEX
from nvila_quant.quant.awq import wrap_scaled_activations

__all__ = ["DequantizedNVILA", "llm_logits", "next_token_metrics"]


def _dequantized_state(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    floats, qlinears, _ = read_quantized_submodel(folder)
    state = {k: v.to(dtype) for k, v in floats.items()}
    for name, qt in qlinears.items():
        state[f"{name}.weight"] = qt.dequantize(dtype)
        if qt.bias is not None:
            state[f"{name}.bias"] = qt.bias.to(dtype)
    return state


class DequantizedNVILA(NVILAQwen2):
    """A quantized NVILA folder as a float model with dequantized linears (float folders load unchanged)."""

    def build_llm(self, llm_dir: Path, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
        if not read_json(llm_dir / "config.json").get("quantization_config"):
            return load_llm(llm_dir, dtype, device)
        cfg = AutoConfig.from_pretrained(str(llm_dir))
        for attr in ("quantization_config", "nvila_quant"):
            if hasattr(cfg, attr):
                delattr(cfg, attr)
        with torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        state = _dequantized_state(llm_dir, dtype)
        missing = set(llm.state_dict()) - set(state)
        if cfg.tie_word_embeddings:
            missing.discard("lm_head.weight")
        if missing:
            raise CheckpointError(f"{llm_dir} lacks tensors {sorted(missing)[:4]}")
        llm.load_state_dict(state, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            llm.lm_head.weight = llm.model.embed_tokens.weight
        llm.model.rotary_emb = type(llm.model.rotary_emb)(config=cfg)
        return llm.to(device).eval()

    def build_projector(
        self, mp_dir: Path, mm_hidden_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device
    ) -> nn.Module:
        cfg = read_json(mp_dir / "config.json")
        if not cfg.get("quantization_config"):
            return super().build_projector(mp_dir, mm_hidden_size, hidden_size, dtype, device)
        projector = MultimodalProjector(cfg["mm_projector_type"], mm_hidden_size, hidden_size)
        wrap_scaled_activations(projector, cfg.get("scaled_activations", []))
        projector.load_state_dict(_dequantized_state(mp_dir, dtype), strict=True)
        return projector.to(device=device, dtype=dtype).eval()


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
        r, t, y = ref[:-1][keep], test[:-1][keep], targets[keep]
        lr, lt = F.log_softmax(r, -1), F.log_softmax(t, -1)
        kl_sum += float((lr.exp() * (lr - lt)).sum())
        agree += float((r.argmax(-1) == t.argmax(-1)).sum())
        nll_ref += float(F.nll_loss(lr, y, reduction="sum"))
        nll_test += float(F.nll_loss(lt, y, reduction="sum"))
        n += int(keep.sum())
    n = max(n, 1)
    return {"kl": kl_sum / n, "top1": agree / n, "ppl_ref": math.exp(nll_ref / n), "ppl": math.exp(nll_test / n),
            "tokens": n}
