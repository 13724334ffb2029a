"""Batch-1 decode steps of a Qwen2-family causal LM without the transformers forward around them.

An eager transformers decode step spends a large share of its time on CPU outside the int4 linears: per-module
``__call__`` machinery, mask and cache bookkeeping, position embeddings recomputed every step, sdpa's setup for one
query, a dozen small aten ops per RMSNorm and rotary call (docs/decode-profile.md). :class:`LeanDecoder` runs the
arithmetic of ``Qwen2ForCausalLM`` with the framework around it gone:

* the linears are the model's own modules (QuantLinear's shortcut goes straight to the bound native kernel), so
  every backend and format runs unchanged;
* the KV cache is one preallocated fp32 (H_kv, max_len, D) pair per layer, written in place at the step's position;
  attention reads the filled prefix, not the whole buffer;
* cos / sin come from a table built once by the model's own rotary module (default RoPE is a function of the
  position alone, so a row of the table is what the module computes for that position);
* on CPU the work between the linears is one native call each (:mod:`nvila_quant.kernels.cpu.step`: residual add +
  RMSNorm, RoPE + cache write, GQA attention, SiLU * up); elsewhere, or without the native library, torch ops.

Elementwise ops round as the eager ones do; attention keeps fp32 scores and sums (as sdpa's CPU kernel does) and the
RMSNorm mean adds in another order, so logits may differ from the eager step by a few roundings of their dtype
(tests/model/test_lean_decode.py: same greedy text in every mode).

Like :class:`~nvila_quant.model.static_decode.StaticDecoder` it is owned by the model's
:class:`~nvila_quant.model.session.DecodeSession`: ``load`` takes a prefilled dynamic cache, ``step`` feeds one token,
``store`` hands the positions back. ``NVILA_QUANT_DECODE=lean`` asks for it; ``auto`` takes it on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from nvila_quant.kernels.cpu.step import STEP_DTYPES, LinearGroup, StepOps, step_ops
from nvila_quant.kernels.linear import QuantLinear

__all__ = ["LeanDecoder", "lean_refusal"]


def _parts(llm: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    body = getattr(llm, "model", None)
    layers = getattr(body, "layers", None)
    if body is None or not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(llm).__name__} has no model.layers")
    return body, layers


def lean_refusal(llm: nn.Module) -> str | None:
    """None when :class:`LeanDecoder` computes exactly what ``llm``'s forward does, else why not."""
    try:
        body, layers = _parts(llm)
    except ValueError as e:
        return str(e)
    config = llm.config
    if getattr(config, "model_type", None) not in ("qwen2",):
        return f"model_type {getattr(config, 'model_type', None)!r} (the lean step is Qwen2's)"
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return f"attention implementation {getattr(config, '_attn_implementation', None)!r}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {config.hidden_act!r}"
    rope = getattr(body, "rotary_emb", None)
    if rope is None or getattr(rope, "rope_type", None) != "default":
        return f"RoPE type {getattr(rope, 'rope_type', None)!r} (only the default one is position-wise)"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "sliding-window attention layers"
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = [(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
        if attn is None or mlp is None or any(not hasattr(m, n) for m, n in names):
            return f"layer {i} is not a Qwen2 decoder layer"
        if not (hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm")):
            return f"layer {i} has no input / post-attention RMSNorm"
    return None


class LeanDecoder:
    """Single-token decode steps of ``llm`` (Qwen2, batch 1) on its own KV cache of ``max_len`` positions."""

    graph = None  # (what the session and the benchmarks read off a decoder: no CUDA graph, no compile)
    compiled = False

    def __init__(self, llm: nn.Module, max_len: int, asked: tuple) -> None:
        why = lean_refusal(llm)
        if why is not None:
            raise ValueError(f"the lean decode step does not apply: {why}")
        self.llm, self.max_len, self.asked = llm, max_len, asked
        body, self.layers = _parts(llm)
        self.embed, self.norm, self.head = llm.get_input_embeddings(), body.norm, llm.get_output_embeddings()
        config = llm.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        attn = self.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        weight = self.embed.weight
        self.dtype, self.device = weight.dtype, weight.device
        shape = (self.kv_heads, max_len, self.head_dim)  # fp32: attention reads them as they are
        self.keys = [torch.zeros(shape, device=self.device) for _ in self.layers]
        self.values = [torch.zeros(shape, device=self.device) for _ in self.layers]
        with torch.inference_mode():  # (1, max_len, D) each, in the activations' dtype, as the module returns them
            probe = torch.empty(1, dtype=self.dtype, device=self.device)
            cos, sin = body.rotary_emb(probe, torch.arange(max_len, device=self.device)[None])
        self.cos, self.sin = cos[0], sin[0]  # (max_len, D)
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)  # (1, 1): the token fed this step
        self.length = 0  # positions in the cache
        self.ops = self._native_ops(body)
        if self.ops is not None:  # the step's own buffers, reused every step
            hidden = config.hidden_size
            norm_dtype = torch.promote_types(body.norm.weight.dtype, self.dtype)
            self.h = torch.empty(1, 1, hidden, dtype=norm_dtype)  # normalised x, the linears' input
            self.a = torch.empty(1, 1, self.heads * self.head_dim, dtype=norm_dtype)  # attention output
            self.act = torch.empty(1, 1, self.layers[0].mlp.down_proj.in_features, dtype=norm_dtype)
            self.scratch = torch.empty(max_len)  # fp32 attention scores
        # per layer: q / k / v and gate / up as one native call each where their kernels allow (int4 T16, bf16)
        self.groups: list[tuple[LinearGroup | None, LinearGroup | None]] = [(None, None)] * len(self.layers)
        if self.ops is not None and self.dtype == torch.bfloat16:
            outs: dict[tuple[str, ...], list[torch.Tensor]] = {}  # shared by the layers (used within a layer)
            for i, layer in enumerate(self.layers):
                attn, mlp = layer.self_attn, layer.mlp
                self.groups[i] = tuple(  # type: ignore[assignment]
                    self._group([getattr(module, n) for n in names], outs, names)
                    for module, names in ((attn, ("q_proj", "k_proj", "v_proj")), (mlp, ("gate_proj", "up_proj"))))

    def _group(self, modules: list[nn.Module], outs: dict, names: tuple[str, ...]) -> LinearGroup | None:
        kernels = [m.native_kernel(torch.bfloat16) if isinstance(m, QuantLinear) else None for m in modules]
        group = LinearGroup.of(self.ops, kernels, outs.get(names))
        if group is not None:
            outs.setdefault(names, group.outs)
        return group

    def _native_ops(self, body: nn.Module) -> StepOps | None:
        """The native step ops where they take this model (CPU, fp32 / bf16 activations and norm weights)."""
        if self.device.type != "cpu" or self.dtype not in STEP_DTYPES or self.head_dim > 1024:
            return None
        norms = [body.norm] + [n for layer in self.layers for n in (layer.input_layernorm,
                                                                      layer.post_attention_layernorm)]
        if any(n.weight.dtype not in STEP_DTYPES for n in norms):
            return None
        if torch.promote_types(body.norm.weight.dtype, self.dtype) != self.dtype:
            return None  # (the linears would see another dtype than the residual stream)
        return step_ops()

    @torch.inference_mode()
    def load(self, cache: DynamicCache) -> None:
        """Start from the keys and values of ``cache`` (a prefilled dynamic cache, batch 1)."""
        n = cache.get_seq_length()
        if n == 0:
            raise ValueError("lean decode starts from a prefilled cache; this one holds no positions")
        if n + 1 > self.max_len:
            raise ValueError(f"{n} cached positions do not fit a cache of {self.max_len}")
        if len(cache.layers) != len(self.layers):
            raise ValueError(f"cache has {len(cache.layers)} layers, the LLM {len(self.layers)}")
        for src, keys, values in zip(cache.layers, self.keys, self.values, strict=True):
            keys[:, :n].copy_(src.keys[0])  # (H_kv, n, D)
            values[:, :n].copy_(src.values[0])
        self.length = n

    @torch.inference_mode()
    def store(self, cache: DynamicCache) -> None:
        """Write the decoded positions back into ``cache`` (which must hold the loaded prefix)."""
        n = self.length
        for dst, keys, values in zip(cache.layers, self.keys, self.values, strict=True):
            dst.keys = keys[None, :, :n].to(self.dtype, copy=True)  # (1, H_kv, n, D)
            dst.values = values[None, :, :n].to(self.dtype, copy=True)
        if cache.get_seq_length() != n:
            raise RuntimeError(f"copying the lean cache back gave {cache.get_seq_length()} positions, expected {n}")

    @staticmethod
    def _rms(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """Qwen2RMSNorm's forward, op for op (fp32 statistics, rounded before the weight)."""
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * h.to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """apply_rotary_pos_emb for one of q / k (1, H, 1, D) with cos / sin (D,)."""
        half = x.shape[-1] // 2
        return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Softmax attention of one query (1, H, 1, D) over the cached keys / values (H_kv, L, D) fp32, each group of
        H / H_kv query heads on its key / value head: fp32 scores, softmax and sum (as sdpa's CPU kernel accumulates),
        one rounding to the activations' dtype. Returns (1, H * D)."""
        qg = q.reshape(self.kv_heads, -1, self.head_dim).to(torch.float32)  # (H_kv, H / H_kv, D)
        scores = torch.matmul(qg, keys.transpose(1, 2)).mul_(self.scaling)  # (H_kv, H / H_kv, L)
        out = torch.matmul(torch.softmax(scores, dim=-1), values)  # (H_kv, H / H_kv, D)
        return out.view(1, -1).to(q.dtype)

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed ``token`` (1, 1) long at position ``length``; return the next-token logits (1, V)."""
        pos = self.length
        if pos + 1 > self.max_len:
            raise ValueError(f"lean cache of {self.max_len} positions is full")
        self.ids.copy_(token.reshape(1, 1))
        logits = self._native_step(pos) if self.ops is not None else self._torch_step(pos)
        self.length = pos + 1
        return logits[:, -1]

    def _native_step(self, pos: int) -> torch.Tensor:
        """The step with the native ops between the linears (one call each); logits (1, 1, V)."""
        ops, h, a, act, scratch = self.ops, self.h, self.a, self.act, self.scratch
        cos, sin = self.cos[pos], self.sin[pos]
        x = self.embed(self.ids)  # (1, 1, H): the residual stream, updated in place
        delta = None  # what the last sublayer adds to x
        for layer, keys, values, (qkv, gate_up) in zip(self.layers, self.keys, self.values, self.groups, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            norm = layer.input_layernorm
            ops.add_rmsnorm(x, delta, norm.weight, h, norm.variance_epsilon)
            # (1, 1, H * D), (1, 1, H_kv * D) x 2
            q, k, v = qkv(h) if qkv is not None else (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h))
            ops.rope_kv(q, k, v, cos, sin, keys, values, pos)
            ops.attend(q, keys, values, pos + 1, self.scaling, a, scratch)
            norm = layer.post_attention_layernorm
            ops.add_rmsnorm(x, attn.o_proj(a), norm.weight, h, norm.variance_epsilon)
            gate, up = gate_up(h) if gate_up is not None else (mlp.gate_proj(h), mlp.up_proj(h))  # (1, 1, I) each
            ops.silu_mul(gate, up, act)
            delta = mlp.down_proj(act)
        ops.add_rmsnorm(x, delta, self.norm.weight, h, self.norm.variance_epsilon)
        return self.head(h)

    def _torch_step(self, pos: int) -> torch.Tensor:
        """The step in torch ops (devices and dtypes the native ops do not take); logits (1, 1, V)."""
        cos, sin, d = self.cos[pos], self.sin[pos], self.head_dim
        x = self.embed(self.ids)  # (1, 1, H)
        for layer, keys, values in zip(self.layers, self.keys, self.values, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            h = self._rms(x, layer.input_layernorm)
            q = self._rotate(attn.q_proj(h).view(1, 1, -1, d).transpose(1, 2), cos, sin)  # (1, H, 1, D)
            k = self._rotate(attn.k_proj(h).view(1, 1, -1, d).transpose(1, 2), cos, sin)  # (1, H_kv, 1, D)
            keys[:, pos].copy_(k[0, :, 0])
            values[:, pos].copy_(attn.v_proj(h).view(-1, d))
            a = self._attend(q, keys[:, :pos + 1], values[:, :pos + 1])  # (1, H * D)
            x = x + attn.o_proj(a.view(1, 1, -1))
            h = self._rms(x, layer.post_attention_layernorm)
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        return self.head(self._rms(x, self.norm))
