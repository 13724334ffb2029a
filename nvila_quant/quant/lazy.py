"""Bounded-memory model access for quantization: an NVILA "shell" and one decoder block at a time.

The shell is the full NVILA pipeline (tokenizer, vision tower, projector, embeddings, rotary
embeddings, mask creation) without decoder blocks: its LLM has a single layer slot holding a
:class:`BlockInputCatcher`, so a forward on ``inputs_embeds`` stops at block 0 and hands over exactly the
hidden states and keyword arguments (mask, position ids / embeddings) that block 0 would get.
Decoder blocks are then built one at a time on the meta device and filled from the safetensors shards, and the
output head (final RMSNorm + ``lm_head``) on its own (:class:`HeadModule`) when it is quantized too.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from nvila_quant.errors import CheckpointError, ConfigError
from nvila_quant.io import Part, as_part, load_state_dict, read_tensors
from nvila_quant.model import NVILAQwen2
from nvila_quant.model.llm import grow_rows
from nvila_quant.model.quantized import llm_config_from_dict

__all__ = ["BlockInputCatcher", "HeadModule", "LLMBlocks", "NVILAShell"]

logger = logging.getLogger(__name__)

_DROP_KWARGS = ("cache", "past_key_values", "past_key_value", "use_cache", "output_attentions")


class _Caught(Exception):
    def __init__(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        super().__init__("block input captured")
        self.hidden, self.kwargs = hidden, kwargs


class BlockInputCatcher(nn.Module):
    """Stands in for decoder block 0: records its call and stops the forward."""

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        raise _Caught(hidden_states, {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS})


def _llm_config(llm: Part) -> PretrainedConfig:
    data = llm.read_config()
    if data.get("quantization_config") or data.get("compression_config"):
        raise CheckpointError(f"{llm} is already quantized; quantize the float checkpoint instead")
    cfg = llm_config_from_dict(data, llm)
    types = set(getattr(cfg, "layer_types", None) or [])
    if len(types) > 1:
        raise ConfigError(f"{llm}: mixed attention layer types {sorted(types)} (sliding windows) are not supported")
    return cfg


class NVILAShell(NVILAQwen2):
    """NVILA with an LLM that holds only embeddings, final norm and rotary embeddings (tied head)."""

    def build_llm(self, llm_dir: Part, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
        cfg = _llm_config(llm_dir)
        shell_cfg = _one_layer(cfg)
        shell_cfg.tie_word_embeddings = True
        with torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(shell_cfg, dtype=dtype)
        self.block_class = type(llm.model.layers[0])
        self.block_config = copy.deepcopy(cfg)
        self.block_config._attn_implementation = llm.config._attn_implementation
        llm.model.layers[0] = BlockInputCatcher()
        llm.model.rotary_emb = type(llm.model.rotary_emb)(config=shell_cfg)
        state = load_state_dict(llm_dir, keys=["model.embed_tokens.weight", "model.norm.weight"], dtype=dtype)
        llm.model.embed_tokens.weight = nn.Parameter(state["model.embed_tokens.weight"], requires_grad=False)
        llm.model.norm.weight = nn.Parameter(state["model.norm.weight"], requires_grad=False)
        llm.lm_head.weight = llm.model.embed_tokens.weight
        left = [n for n, t in [*llm.named_parameters(), *llm.named_buffers()] if t.device.type == "meta"]
        if left:
            raise RuntimeError(f"shell LLM still has meta tensors: {left[:4]}")
        return llm.to(device).eval()

    def free_vision_tower(self) -> None:
        """Drop the vision tower's weights once its outputs are cached."""
        self.get_vision_tower().vision_tower.to("meta")

    @torch.no_grad()
    def block_inputs(self, hidden: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """(hidden, kwargs) that decoder block 0 receives for ``inputs_embeds`` = hidden (1, T, H)."""
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        try:
            self.get_llm().model(inputs_embeds=hidden, attention_mask=mask, use_cache=False)
        except _Caught as caught:
            return caught.hidden, caught.kwargs
        raise RuntimeError("the LLM forward never reached decoder block 0")


class HeadModule(nn.Module):
    """The LLM's output head as one more "block": ``model.norm`` (the final RMSNorm), then ``lm_head``. Attribute
    paths are the checkpoint's keys (``model.norm.weight``, ``lm_head.weight``). hidden (..., H) -> logits (..., V)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Linear) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.norm = norm
        self.lm_head = lm_head

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(hidden_states))


class LLMBlocks:
    """Decoder blocks of ``llm/`` (or the ``llm.`` tensors of a flat checkpoint) built one at a time from the
    safetensors shards."""

    def __init__(self, llm_dir: Path | Part, block_class: type[nn.Module], block_config: PretrainedConfig) -> None:
        self.llm_dir = as_part(llm_dir)
        self.block_class, self.config = block_class, block_config
        self.key_map = self.llm_dir.key_map()
        self.num_layers = int(block_config.num_hidden_layers)

    @classmethod
    def from_folder(cls, llm_dir: Path | Part) -> LLMBlocks:
        llm_dir = as_part(llm_dir)
        cfg = _llm_config(llm_dir)
        with torch.device("meta"):
            probe = AutoModelForCausalLM.from_config(_one_layer(cfg))
        block_cfg = copy.deepcopy(cfg)
        block_cfg._attn_implementation = probe.config._attn_implementation
        return cls(llm_dir, type(probe.model.layers[0]), block_cfg)

    def prefix(self, index: int) -> str:
        return f"model.layers.{index}."

    def meta_block(self, index: int = 0) -> nn.Module:
        with torch.device("meta"):
            return self.block_class(self.config, index)

    def load(self, index: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
        """Block ``index`` with its weights (cast to ``dtype``) on ``device``."""
        block = self.meta_block(index)
        prefix = self.prefix(index)
        keys = [k for k in self.key_map if k.startswith(prefix)]
        expected = set(block.state_dict())
        got = {k[len(prefix):] for k in keys}
        if got != expected:
            raise CheckpointError(
                f"{self.llm_dir}: block {index} tensors do not match the model: missing {sorted(expected - got)[:4]}, "
                f"unexpected {sorted(got - expected)[:4]}"
            )
        state = {k[len(prefix):]: v for k, v in read_tensors(self.key_map, keys, dtype, device).items()}
        block.load_state_dict(state, assign=True)
        return block.to(device).eval()

    def head_key(self) -> str:
        """The tensor the output head computes with: ``lm_head.weight``, or the embeddings when they are tied."""
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        return "lm_head.weight" if not tied and "lm_head.weight" in self.key_map else "model.embed_tokens.weight"

    def load_head(self, rows: int, dtype: torch.dtype, device: torch.device) -> HeadModule:
        """The final RMSNorm and the head (cast to ``dtype``) on ``device``, the head grown to ``rows`` rows with the
        mean of the stored rows (computed from the stored values, rounded to their dtype: what the runtime gives the
        media tokens' rows, whatever ``dtype`` is)."""
        state = read_tensors(self.key_map, [self.head_key(), "model.norm.weight"])
        stored = state[self.head_key()]  # (V_stored, H)
        weight = grow_rows(stored, rows, stored.dtype).to(device=device, dtype=dtype)  # (rows, H)
        with torch.device("meta"):
            probe = AutoModelForCausalLM.from_config(_one_layer(self.config))
        norm = copy.deepcopy(probe.model.norm)
        norm.load_state_dict({"weight": state["model.norm.weight"].to(device=device, dtype=dtype)}, assign=True)
        lm_head = nn.Linear(weight.shape[1], rows, bias=False, device="meta")
        lm_head.weight = nn.Parameter(weight, requires_grad=False)
        return HeadModule(norm, lm_head).to(device).eval()

    def other_keys(self) -> list[str]:
        """Tensors outside the decoder blocks (embeddings, final norm, lm_head)."""
        return [k for k in self.key_map if not k.startswith("model.layers.")]


def _one_layer(cfg: PretrainedConfig) -> PretrainedConfig:
    one = copy.deepcopy(cfg)
    one.num_hidden_layers = 1
    if getattr(cfg, "layer_types", None):
        one.layer_types = list(cfg.layer_types[:1])
    return one
