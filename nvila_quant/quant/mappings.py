"""Scale groups: which op's output is divided by the AWQ scales and which linears absorb them.

A group (prev_op -> linears) is function preserving: ``prev_op`` output channel j is divided by s_j and
input column j of every linear is multiplied by s_j. With GQA the v_proj -> o_proj group maps each v_proj
output row to the o_proj input columns of every query head sharing its KV head (``index``).

Names are module paths relative to the block (a Qwen2 decoder layer, or the projector module), so that
prefixed with ``model.layers.<i>.`` / nothing they are the checkpoint's module names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ACT_TYPES",
    "NORM_TYPES",
    "ScaleGroup",
    "block_linears",
    "gqa_index",
    "projector_groups",
    "qwen2_block_groups",
]

NORM_TYPES = ("RMSNorm", "LayerNorm")
ACT_TYPES = (nn.GELU, nn.SiLU, nn.ReLU)


@dataclass(frozen=True)
class ScaleGroup:
    """One AWQ scale group.

    Args:
        name: label for logs ("attn.qkv", "attn.vo", "mlp.gate_up", "mlp.down", "layers.2").
        prev_op: module whose output channels are divided by s.
        prev_kind: "norm" (weight and bias / s), "linear" (output rows and bias / s) or "act" (act(x) / s).
        linears: linears whose input columns are multiplied by s (the candidates that get quantized).
        inspect: module whose output the scale search compares (fp32 MSE).
        token_wise: ``inspect`` acts on each token separately, so its loss can be evaluated in token chunks.
        kv_heads / heads / head_dim: set for a GQA v_proj -> o_proj group (see :func:`gqa_index`).
    """

    name: str
    prev_op: str
    prev_kind: str
    linears: tuple[str, ...]
    inspect: str
    token_wise: bool = True
    kv_heads: int = 0
    heads: int = 0
    head_dim: int = 0

    def index(self) -> torch.Tensor | None:
        """For GQA: (heads * head_dim,) long, linear input column -> prev_op output row; else None."""
        if not self.kv_heads or self.kv_heads == self.heads:
            return None
        return gqa_index(self.heads, self.kv_heads, self.head_dim)


def gqa_index(heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """o_proj input column h * head_dim + d reads v_proj row (h // (heads / kv_heads)) * head_dim + d.

    Matches ``repeat_kv``: query head h uses KV head h // n_rep. Returns (heads * head_dim,) int64.
    """
    if heads % kv_heads:
        raise ValueError(f"heads must be a multiple of kv_heads (got heads={heads}, kv_heads={kv_heads})")
    n_rep = heads // kv_heads
    h = torch.arange(heads).repeat_interleave(head_dim)  # (heads * head_dim,)
    d = torch.arange(head_dim).repeat(heads)
    return (h // n_rep) * head_dim + d


def qwen2_block_groups(config, gqa_vo: bool = False) -> list[ScaleGroup]:
    """The reference's four groups of a Qwen2 / Llama decoder block (v->o only when shapes allow it).

    ``gqa_vo``: keep the v->o group on GQA models (the reference skips it whenever
    v_proj.weight.shape != o_proj.weight.shape, i.e. on every GQA model, Qwen2 included).
    """
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    groups = [
        ScaleGroup("attn.qkv", "input_layernorm", "norm",
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn", token_wise=False),
    ]
    same_shape = kv_heads == heads and heads * head_dim == config.hidden_size
    if same_shape or gqa_vo:
        groups.append(ScaleGroup("attn.vo", "self_attn.v_proj", "linear", ("self_attn.o_proj",), "self_attn.o_proj",
                                 kv_heads=kv_heads, heads=heads, head_dim=head_dim))
    groups += [
        ScaleGroup("mlp.gate_up", "post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScaleGroup("mlp.down", "mlp.up_proj", "linear", ("mlp.down_proj",), "mlp.down_proj"),
    ]
    return groups


def projector_groups(projector: nn.Module) -> list[ScaleGroup]:
    """Groups of NVILA's projector ``layers`` (nn.Sequential): LayerNorm -> Linear, activation -> Linear and
    Linear -> Linear pairs. Names are relative to the projector (``layers.1`` -> ``layers.2``)."""
    layers = getattr(projector, "layers", None)
    if not isinstance(layers, nn.Sequential):
        return []  # "linear" / "identity": no op in front of the Linear to absorb a scale
    mods = list(layers)
    groups = []
    for i in range(1, len(mods)):
        if not isinstance(mods[i], nn.Linear):
            continue
        prev = mods[i - 1]
        if isinstance(prev, nn.LayerNorm):
            kind = "norm"
        elif isinstance(prev, ACT_TYPES):
            kind = "act"
        elif isinstance(prev, nn.Linear):
            kind = "linear"
        else:
            continue
        groups.append(ScaleGroup(f"layers.{i}", f"layers.{i - 1}", kind, (f"layers.{i}",), f"layers.{i}"))
    return groups


def block_linears(block: nn.Module) -> list[str]:
    """Names of every nn.Linear in a block (in module order): the weights that get quantized."""
    return [name for name, m in block.named_modules() if isinstance(m, nn.Linear)]
