"""W8A8 of the SigLIP vision tower with SmoothQuant: a smoothing search per layer, then int8 linears.

Per encoder layer (only the layers NVILA's feature selection runs), on the calibration tiles' activations, with the
layers before it already quantized (each layer sees what the quantized tower feeds it):

| group | smoothing folded into | linears |
|---|---|---|
| ``attn.qkv`` | ``layer_norm1`` (weight and bias / m) | q_proj, k_proj, v_proj |
| ``attn.out`` | ``self_attn.v_proj`` (output rows and bias / m; attention mixes tokens, not channels) | out_proj |
| ``mlp.fc1`` | ``layer_norm2`` | fc1 |
| ``mlp.fc2`` | none (GELU between): plain W8A8 | fc2 |

Each group tries no smoothing and m = max|x|^a / max|W|^(1-a) for every a of the grid; the candidate of least summed
output error (int8 weights per channel, int8 activations per token, against the float linears on a seeded token
subset) wins. A linear whose relative output error (error energy / output energy) stays above
``max_error`` is kept float and listed. The patch embedding, norms, the unused last layers and the S2 merge stay float.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from nvila_quant.formats.compressed_tensors import int8_quantization_config
from nvila_quant.io import Part, save_state_dict, write_json
from nvila_quant.kernels.int8 import Int8Linear
from nvila_quant.model.layout import write_side_files
from nvila_quant.numerics.int8 import quantize_weight, smooth_factors, w8a8_linear
from nvila_quant.quant.awq import sample_tokens

__all__ = ["SMOOTH_GROUPS", "SmoothGroup", "VisionQuantConfig", "VisionResult", "quantize_tower", "save_tower",
           "search_smoothing"]


@dataclass(frozen=True)
class SmoothGroup:
    """Linears sharing an input, and the op whose output channels absorb 1 / m (None: no smoothing)."""

    name: str
    prev_op: str | None
    prev_kind: str  # "norm" | "linear" | ""
    linears: tuple[str, ...]


SMOOTH_GROUPS = (
    SmoothGroup("attn.qkv", "layer_norm1", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    SmoothGroup("attn.out", "self_attn.v_proj", "linear", ("self_attn.out_proj",)),
    SmoothGroup("mlp.fc1", "layer_norm2", "norm", ("mlp.fc1",)),
    SmoothGroup("mlp.fc2", None, "", ("mlp.fc2",)),
)


@dataclass
class VisionQuantConfig:
    """Settings of the tower's W8A8.

    Args:
        alphas: SmoothQuant migration strengths tried per group (besides no smoothing).
        search_tokens: calibration tokens (a seeded random subset) the search's errors use; the activation maxima
            use every token.
        max_error: a linear whose relative output error stays above this is kept float.
        seed: the token subset.
    """

    alphas: tuple[float, ...] = tuple(i / 10 for i in range(11))
    search_tokens: int = 4096
    max_error: float = 0.05
    seed: int = 42


@dataclass
class VisionResult:
    """The tower after quantization (``Int8Linear`` modules in place) and what the search chose, per layer."""

    quantized: list[str] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)
    log: dict[str, Any] = field(default_factory=dict)


def search_smoothing(x: torch.Tensor, x_absmax: torch.Tensor, weights: Sequence[torch.Tensor],
                     biases: Sequence[torch.Tensor | None], alphas: Sequence[float],
                     can_smooth: bool) -> tuple[float | None, torch.Tensor, list[float], list[dict]]:
    """The smoothing of least W8A8 output error for linears sharing the input x.

    x: (T, K) search tokens; x_absmax: (K,) over every token; weights: [(N_i, K)]. Returns (alpha or None for no
    smoothing, m (K,) float32, the chosen candidate's relative error per linear, every candidate's errors)."""
    xf = x.float()
    refs = [xf @ w.float().t() + (0 if b is None else b.float()) for w, b in zip(weights, biases, strict=True)]
    energy = [max(float(r.pow(2).sum()), 1e-30) for r in refs]
    w_absmax = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0)
    candidates: list[float | None] = [None, *(alphas if can_smooth else [])]
    best: tuple[float, float | None, torch.Tensor, list[float]] | None = None
    tried = []
    for a in candidates:
        m = torch.ones_like(x_absmax, dtype=torch.float32) if a is None else smooth_factors(x_absmax, w_absmax, a)
        xs = xf / m
        rel = []
        for w, b, ref, e in zip(weights, biases, refs, energy, strict=True):
            q, s = quantize_weight(w.float() * m)
            y = w8a8_linear(xs, q, s, None if b is None else b.float())
            rel.append(float((y - ref).pow(2).sum()) / e)
        total = sum(r * e for r, e in zip(rel, energy, strict=True)) / sum(energy)
        tried.append({"alpha": a, "rel_error": total, "per_linear": rel})
        if best is None or total < best[0]:
            best = (total, a, m, rel)
    assert best is not None
    return best[1], best[2], best[3], tried


@torch.no_grad()
def _fold(layer: nn.Module, group: SmoothGroup, m: torch.Tensor) -> None:
    """Divide prev_op's output channels by m, multiply the linears' input columns by m (function preserving)."""
    prev = layer.get_submodule(group.prev_op)
    mm = m.to(prev.weight.device)
    if group.prev_kind == "norm":
        prev.weight.div_(mm.to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(mm.to(prev.bias.dtype))
    else:
        prev.weight.div_(mm.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(mm.to(prev.bias.dtype))
    for name in group.linears:
        lin = layer.get_submodule(name)
        lin.weight.mul_(mm.view(1, -1).to(lin.weight.dtype))


def _replace(layer: nn.Module, name: str, new: nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(layer.get_submodule(owner) if owner else layer, attr, new)


def _keep_input(store: dict[str, torch.Tensor], name: str):  # noqa: ANN202 (a forward pre-hook)
    def hook(module: nn.Module, args: tuple) -> None:
        store[name] = args[0].detach()

    return hook


def _run_layer(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    out = layer(h, None)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def quantize_tower(tower: nn.Module, tiles: torch.Tensor, config: VisionQuantConfig | None = None,
                   prefix: str = "vision_model.encoder.layers", progress: bool = True) -> VisionResult:
    """W8A8 of a ``VisionTower`` in place. tiles: (N, 3, S, S) calibration tiles (preprocessed).

    Names in the result are the checkpoint's (``prefix``.<i>.<linear>)."""
    config = config or VisionQuantConfig()
    vit = tower.vit
    layers = vit.encoder.layers
    used = tower.num_layers_used
    result = VisionResult(log={"layers": [], "settings": {
        "alphas": list(config.alphas), "search_tokens": config.search_tokens, "max_error": config.max_error,
        "seed": config.seed}, "tiles": int(tiles.shape[0])})
    h = vit.embeddings(tiles.to(device=tower.device, dtype=tower.dtype))  # (N, P, C)
    for i in tqdm(range(used), desc="vision tower W8A8", disable=not progress):
        t0 = time.perf_counter()
        layer = layers[i]
        inputs: dict[str, torch.Tensor] = {}
        hooks = [layer.get_submodule(g.linears[0]).register_forward_pre_hook(_keep_input(inputs, g.name))
                 for g in SMOOTH_GROUPS]
        try:
            _run_layer(layer, h)
        finally:
            for hk in hooks:
                hk.remove()
        entry: dict[str, Any] = {"index": i, "groups": []}
        # every group's search first, on the float layer, then the folds (a fold changes the next group's input)
        plans = []
        for g in SMOOTH_GROUPS:
            x = inputs[g.name]
            flat = x.reshape(-1, x.shape[-1])
            x_absmax = flat.abs().float().amax(0)
            xs = sample_tokens([flat], config.search_tokens, config.seed)
            lins = [layer.get_submodule(n) for n in g.linears]
            alpha, m, rel, tried = search_smoothing(xs, x_absmax, [lin.weight for lin in lins],
                                                    [lin.bias for lin in lins], config.alphas, g.prev_op is not None)
            plans.append((g, alpha, m, rel))
            entry["groups"].append({"name": g.name, "alpha": alpha, "rel_error": dict(zip(g.linears, rel,
                                                                                        strict=True)),
                                    "tried": tried})
        for g, alpha, m, _ in plans:
            if alpha is not None:
                _fold(layer, g, m)
        for g, _, _, rel in plans:
            for name, err in zip(g.linears, rel, strict=True):
                full = f"{prefix}.{i}.{name}"
                if err > config.max_error:
                    result.kept_float.append(full)
                    continue
                _replace(layer, name, Int8Linear.from_linear(layer.get_submodule(name)))
                result.quantized.append(full)
        h = _run_layer(layer, h)  # what the next layer sees from the quantized one
        entry["time_s"] = time.perf_counter() - t0
        result.log["layers"].append(entry)
    result.kept_float += [f"{prefix}.{i}.{g_lin}" for i in range(used, len(layers)) for g in SMOOTH_GROUPS
                          for g_lin in g.linears]  # never run for NVILA's features: left as they are
    result.log["quantized"], result.log["kept_float"] = result.quantized, result.kept_float
    return result


def save_tower(tower: nn.Module, result: VisionResult, source: Part, dst: Path, save_dtype: torch.dtype) -> None:
    """``vision_tower/`` of a W8A8 tower: compressed-tensors ``int-quantized`` (weight int8, weight_scale fp32 per
    channel; activations dynamic per token), every other tensor (the smoothed norms included) in ``save_dtype``,
    keys prefixed ``vision_model.`` as NVIDIA's files; config.json with its ``quantization_config``."""
    state = {}
    for key, t in tower.vision_tower.state_dict().items():
        name = key if key.startswith("vision_model.") else f"vision_model.{key}"
        if t.dtype == torch.int8 or name.endswith(".weight_scale"):
            state[name] = t.contiguous().cpu()
        else:
            state[name] = t.to(save_dtype).contiguous().cpu()
    dst.mkdir(parents=True, exist_ok=True)
    save_state_dict(state, dst)
    cfg = dict(source.read_config())
    cfg["quantization_config"] = int8_quantization_config(result.kept_float)
    write_json(dst / "config.json", cfg)
    write_side_files(source, dst)
