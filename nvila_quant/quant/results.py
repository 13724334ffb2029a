"""Persisting quantization results: per-block work files and ``awq_results.safetensors``.

``awq_results.safetensors`` holds the searched scales and clip thresholds under module names of the
NVILA model (``llm.model.layers.0.input_layernorm``, ``mm_projector.layers.1``) so that
:func:`apply_awq_results` re-applies them to a float model; quantizing its linears with round to nearest
then reproduces the checkpoint's weights. Tensors:

    scale.<k>: (C,) float32    scales of group k, per output channel of its prev op
    index.<k>: (C_in,) int64   (GQA groups only) linear input column -> prev-op channel
    clip.<module>: (N, K/G)    clipping thresholds of a linear (applied after the scales)

and the metadata entry ``awq_results`` (JSON): ``{"version": 1, "groups": [{"key", "name", "prev_op",
"prev_kind", "linears", "inspect", "kv_heads", "heads", "head_dim", ...}], "clips": [...]}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from nvila_quant.errors import CheckpointError
from nvila_quant.numerics.qtensor import QTensor
from nvila_quant.quant.awq import ScaledActivation, apply_clip, apply_scales, wrap_scaled_activations
from nvila_quant.quant.block import BlockResult
from nvila_quant.quant.mappings import ScaleGroup

__all__ = ["AWQResultsWriter", "apply_awq_results", "load_block_result", "read_awq_results", "save_block_result"]

RESULTS_KEY = "awq_results"
_GROUP_FIELDS = {f.name for f in fields(ScaleGroup)}


# ---------------------------------------------------------------------------------------------- work files
def save_block_result(path: str | os.PathLike, result: BlockResult) -> None:
    """One block's result as safetensors (written to a temporary name, then renamed)."""
    tensors: dict[str, torch.Tensor] = {}
    linears = {}
    for name, qt in result.qlinears.items():
        tensors[f"q.{name}"], tensors[f"scale.{name}"], tensors[f"zero.{name}"] = qt.q, qt.scale, qt.zero
        if qt.bias is not None:
            tensors[f"bias.{name}"] = qt.bias
        linears[name] = {"bits": qt.bits, "group_size": qt.group_size, "symmetric": qt.symmetric}
    for key, t in result.floats.items():
        tensors[f"float.{key}"] = t
    groups = []
    for k, (group, s) in enumerate(result.scales):
        tensors[f"awq.scale.{k}"] = s.float()
        groups.append(asdict(group))
    for name, mv in result.clips.items():
        tensors[f"awq.clip.{name}"] = mv
    meta = {"linears": linears, "groups": groups, "log": result.log}
    tmp = Path(f"{path}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"block": json.dumps(meta, default=float)})
    os.replace(tmp, path)


def load_block_result(path: str | os.PathLike) -> BlockResult:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["block"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    qlinears = {
        name: QTensor(t[f"q.{name}"], t[f"scale.{name}"], t[f"zero.{name}"], info["bits"], info["group_size"],
                      info["symmetric"], t.get(f"bias.{name}"))
        for name, info in meta["linears"].items()
    }
    floats = {k.removeprefix("float."): v for k, v in t.items() if k.startswith("float.")}
    scales = [(_group(g), t[f"awq.scale.{k}"]) for k, g in enumerate(meta["groups"])]
    clips = {k.removeprefix("awq.clip."): v for k, v in t.items() if k.startswith("awq.clip.")}
    return BlockResult(qlinears, floats, scales, clips, meta["log"])


def _group(d: dict) -> ScaleGroup:
    return ScaleGroup(**{**d, "linears": tuple(d["linears"])})


# ---------------------------------------------------------------------------------------------- awq_results
class AWQResultsWriter:
    """Collects scales and clips of every block (with a module-name prefix) into one safetensors file."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.groups: list[dict] = []
        self.clips: list[str] = []

    def add(self, prefix: str, result: BlockResult) -> None:
        for group, s in result.scales:
            k = len(self.groups)
            self.tensors[f"scale.{k}"] = s.float().cpu()
            index = group.index()
            if index is not None:
                self.tensors[f"index.{k}"] = index
            self.groups.append({
                **asdict(group), "key": k, "prev_op": prefix + group.prev_op, "inspect": prefix + group.inspect,
                "linears": [prefix + n for n in group.linears], "name": prefix + group.name,
            })
        for name, mv in result.clips.items():
            self.tensors[f"clip.{prefix}{name}"] = mv.cpu()
            self.clips.append(prefix + name)

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> None:
        meta = {"version": 1, "groups": self.groups, "clips": self.clips, **(extra or {})}
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path),
                  metadata={"format": "pt", RESULTS_KEY: json.dumps(meta)})


def read_awq_results(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of an ``awq_results.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing AWQ results file {path}")
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(RESULTS_KEY)
        if raw is None:
            raise CheckpointError(f"{path} has no '{RESULTS_KEY}' metadata: not an nvila-quant AWQ results file")
        return json.loads(raw), {k: f.get_tensor(k) for k in f.keys()}


def _untie(model: nn.Module, linears: set[str]) -> None:
    """Give each of ``linears`` whose weight another module shares (a tied lm_head) a weight of its own: the results
    scale and clip it alone, as the quantized checkpoint does."""
    for name in sorted(linears):
        module = model.get_submodule(name)
        weight = module.weight
        shared = [n for n, p in model.named_parameters(remove_duplicate=False)
                  if p is weight and n != f"{name}.weight"]
        if shared:
            module.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)


@torch.no_grad()
def apply_awq_results(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Fold saved scales and clips into a float model (in place), e.g. an ``NVILAQwen2``.

    Activations that absorb scales are wrapped in :class:`ScaledActivation`. The arithmetic is the
    quantizer's own (:func:`apply_scales`, :func:`apply_clip`), so rounding the result to nearest gives
    the checkpoint's weights bit for bit (for a model in the compute dtype of the run).
    """
    meta, tensors = read_awq_results(path)
    groups = [(ScaleGroup(**{k: v for k, v in g.items() if k in _GROUP_FIELDS} | {"linears": tuple(g["linears"])}),
               tensors[f"scale.{g['key']}"]) for g in meta["groups"]]
    acts = [g.prev_op for g, _ in groups if g.prev_kind == "act"]
    wrap_scaled_activations(model, [a for a in acts if not isinstance(model.get_submodule(a), ScaledActivation)])
    changed = {n for g, _ in groups for n in g.linears} | set(meta["clips"])
    _untie(model, changed)
    for name in sorted(set(meta["clips"])):
        rows, clip_rows = model.get_submodule(name).weight.shape[0], tensors[f"clip.{name}"].shape[0]
        if rows != clip_rows:
            raise CheckpointError(
                f"{path}: the clips of {name} have {clip_rows} rows but the model's weight has {rows} (an int4 "
                "lm_head's results are for the head grown to the tokenizer and padded to a multiple of 64, "
                "nvila_quant.quant.head.head_rows: grow the model's head to that first)"
            )
    params = dict(model.named_parameters())
    state = {k: p.data for k, p in params.items()}
    for group, s in groups:
        apply_scales(state, group, s)
    for name in meta["clips"]:
        apply_clip(state, name, tensors[f"clip.{name}"])
    for k, p in params.items():
        if state[k] is not p.data:
            p.data = state[k]
    return model
