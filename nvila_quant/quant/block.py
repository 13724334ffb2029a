"""AWQ of one block (a decoder layer or the projector): record inputs, search scales, clip, quantize.

Follows the reference's per-block flow: one full-precision forward records every linear's input and
the block output; every group's scale search runs on the unmodified block; all scales are then folded
in (and the recorded inputs divided by them); the clip search runs on the scaled weights; finally every
linear is quantized with the reference quantizer. Losses are evaluated sample by sample, and token-wise
modules in chunks of ``chunk_tokens`` tokens, so no module sees more than one chunk at a time.

The cheaper searches (``numerics="fast"``): the scale losses on at most ``search_tokens`` calibration tokens (a seeded
random subset; whole samples for the attention group, which mixes tokens), a coarse-to-fine ratio grid, and for a
group whose inspected module is its single linear the Gram-matrix form of its output MSE over every token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from nvila_quant.numerics.qtensor import QTensor
from nvila_quant.quant.awq import (
    COARSE_STEP,
    QuantArgs,
    act_mean,
    apply_clip,
    apply_scales,
    compute_scales,
    gram,
    gram_mse,
    reduce_to_rows,
    sample_tokens,
    search_clip,
    search_evaluations,
    search_scales,
    skip_clip,
    weight_mean,
)
from nvila_quant.quant.config import AWQConfig
from nvila_quant.quant.mappings import ScaleGroup

__all__ = ["BlockInputs", "BlockResult", "effective_state", "quantize_block", "run_block"]


@dataclass
class BlockInputs:
    """Per-sample calls of a block: ``block(*args[i], **kwargs[i])``."""

    args: list[tuple]
    kwargs: list[dict[str, Any]]

    def __post_init__(self) -> None:
        if len(self.args) != len(self.kwargs):
            raise ValueError(f"args and kwargs differ in length ({len(self.args)} vs {len(self.kwargs)})")

    def __len__(self) -> int:
        return len(self.args)

    def with_hidden(self, hidden: Sequence[torch.Tensor]) -> BlockInputs:
        """The same calls with a new first positional argument (the next block's hidden states)."""
        return BlockInputs([(h, *a[1:]) for h, a in zip(hidden, self.args, strict=True)], self.kwargs)


@dataclass
class BlockResult:
    """What one block's quantization produced (names relative to the block).

    qlinears: quantized linears; floats: every other tensor of the block after scaling (norm weights,
    activation scales, linears kept in float) in the save dtype; scales: searched scales per group;
    clips: clip thresholds (N, K/G) per linear; outputs: the next block's inputs (None without calibration).
    """

    qlinears: dict[str, QTensor]
    floats: dict[str, torch.Tensor]
    scales: list[tuple[ScaleGroup, torch.Tensor]] = field(default_factory=list)
    clips: dict[str, torch.Tensor] = field(default_factory=dict)
    log: dict[str, Any] = field(default_factory=dict)
    outputs: list[torch.Tensor] | None = None


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def run_block(block: nn.Module, inputs: BlockInputs,
              state: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Outputs of ``block`` on every sample (with ``state`` substituted for its parameters when given)."""
    outs = []
    for args, kwargs in zip(inputs.args, inputs.kwargs, strict=True):
        out = block(*args, **kwargs) if state is None else functional_call(block, dict(state), args, kwargs)
        outs.append(_first(out))
    return outs


def _mse(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    sq, n = 0.0, 0
    for x, y in zip(a, b, strict=True):
        sq += float((x.float() - y.float()).pow(2).sum())
        n += x.numel()
    return sq / max(n, 1)


def _token_chunks(xs: Sequence[torch.Tensor], chunk: int) -> Iterator[torch.Tensor]:
    """Views of (tokens, C) chunks of every tensor (..., C)."""
    for x in xs:
        yield from x.reshape(-1, x.shape[-1]).split(chunk)


def _subsample(xs: Sequence[torch.Tensor], n_tokens: int) -> torch.Tensor:
    """Rows 0, s, 2s, ... (s = max(1, T // n_tokens)) of the concatenation of xs (..., C) -> (T', C),
    without materializing the concatenation."""
    flats = [x.reshape(-1, x.shape[-1]) for x in xs]
    total = sum(f.shape[0] for f in flats)
    stride = max(1, total // n_tokens)
    picked, offset = [], 0
    for f in flats:
        first = (-offset) % stride
        picked.append(f[first::stride])
        offset += f.shape[0]
    return torch.cat(picked, dim=0)


def effective_state(
    state: Mapping[str, torch.Tensor], qlinears: Mapping[str, QTensor], save_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The parameters the saved block computes with: dequantized linears, other tensors rounded to save_dtype."""
    out = {}
    for key, t in state.items():
        out[key] = t.to(save_dtype).to(t.dtype)
    for name, qt in qlinears.items():
        w = state[f"{name}.weight"]
        out[f"{name}.weight"] = qt.dequantize(w.dtype).to(w.device)
        if qt.bias is not None:
            out[f"{name}.bias"] = qt.bias.to(device=w.device, dtype=w.dtype)
    return out


def _quantize_linears(
    state: Mapping[str, torch.Tensor], qargs: Mapping[str, QuantArgs | None], save_dtype: torch.dtype
) -> dict[str, QTensor]:
    out = {}
    for name, q in qargs.items():
        if q is None:
            continue
        bias = state.get(f"{name}.bias")
        out[name] = QTensor.from_float(
            state[f"{name}.weight"].float(), q.bits, q.group_size, q.zero_point,
            bias=None if bias is None else bias.to(save_dtype).cpu(), scale_dtype=save_dtype,
        ).to("cpu")
    return out


def _relative(inspect: str, linear: str) -> str:
    return "weight" if linear == inspect else f"{linear[len(inspect) + 1:]}.weight"


class _Recorder:
    """Forward pre-hooks that keep each linear's input and each inspected module's (args, kwargs)."""

    def __init__(self, block: nn.Module, linears: Sequence[str], inspects: Sequence[str]) -> None:
        self.x: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
        self.calls: dict[str, list[tuple[tuple, dict]]] = {n: [] for n in inspects}
        self.handles = []
        for n in linears:
            self.handles.append(block.get_submodule(n).register_forward_pre_hook(self._linear_hook(n)))
        for n in inspects:
            self.handles.append(
                block.get_submodule(n).register_forward_pre_hook(self._call_hook(n), with_kwargs=True)
            )

    def _linear_hook(self, name: str):
        def hook(module, args):
            self.x[name].append(args[0].detach())

        return hook

    def _call_hook(self, name: str):
        def hook(module, args, kwargs):
            self.calls[name].append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _call_tokens(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))


def _group_calls(group: ScaleGroup, rec: _Recorder, chunk_tokens: int, search_tokens: int = 0,
                 seed: int = 0) -> list[tuple[tuple, dict]]:
    """The inspected module's calls: per sample, or (for token-wise modules) per chunk of tokens. ``search_tokens``
    > 0: at most that many tokens, a seeded random subset (token-wise) or whole samples, a seeded random choice in
    order, until the budget is spent (at least one)."""
    calls = rec.calls[group.inspect]
    xs = [_call_tokens(a, kw) for a, kw in calls]
    if not group.token_wise:
        if search_tokens <= 0 or sum(x[..., 0].numel() for x in xs) <= search_tokens:
            return calls
        order = torch.randperm(len(calls), generator=torch.Generator().manual_seed(seed)).tolist()
        keep, used = [], 0
        for i in order:
            n = xs[i][..., 0].numel()
            if keep and used + n > search_tokens:
                continue
            keep.append(i)
            used += n
        return [calls[i] for i in sorted(keep)]
    if search_tokens > 0:
        xs = [sample_tokens(xs, search_tokens, seed)]
    return [((c,), {}) for c in _token_chunks(xs, chunk_tokens)]


@torch.no_grad()
def quantize_block(
    block: nn.Module,
    inputs: BlockInputs | None,
    groups: Sequence[ScaleGroup],
    qargs: Mapping[str, QuantArgs | None],
    config: AWQConfig,
    save_dtype: torch.dtype,
    desc: str = "block",
    progress: bool = True,
) -> BlockResult:
    """Quantize every linear in ``qargs`` (None: keep in float) of one block.

    ``inputs`` None (RTN without calibration): plain round to nearest, no errors logged, no outputs.
    With ``config.method == "rtn"`` and inputs: round to nearest, with the block output error logged.
    """
    t0 = time.perf_counter()
    log: dict[str, Any] = {"groups": [], "clip": {}}
    if inputs is None:  # the weights are only read: no copy
        state = block.state_dict()
        qlinears = _quantize_linears(state, qargs, save_dtype)
        floats = _floats(state, qlinears, save_dtype)
        log["time_s"] = {"total": time.perf_counter() - t0}
        return BlockResult(qlinears, floats, log=log)
    state = {k: v.detach().clone() for k, v in block.state_dict().items()}  # searched scales and clips change it

    linears = list(qargs)
    searching = config.method == "awq"
    active = [g for g in groups if searching]
    rec = _Recorder(block, linears if searching else [], [g.inspect for g in active])
    try:
        float_out = run_block(block, inputs)
    finally:
        rec.remove()
    t_record = time.perf_counter()

    # 1. scale search on the unmodified block
    searched: list[tuple[ScaleGroup, torch.Tensor]] = []
    for group in active:
        searched.append((group, _search_group(block, group, rec, state, qargs, config, log, desc, progress)))
    t_scale = time.perf_counter()

    # 2. fold the scales in; 3. clip search on the scaled weights, with inputs divided by the scales
    to_clip = [n for n in linears if searching and config.clip and qargs[n] is not None and not skip_clip(n)]
    clip_x = {name: _subsample(rec.x[name], config.clip_tokens) for name in to_clip}
    rec.x.clear()
    rec.calls.clear()
    for group, s in searched:
        apply_scales(state, group, s)
        index = group.index()
        s_cols = s if index is None else s[index.to(s.device)]
        for name in group.linears:
            if name in clip_x:
                clip_x[name] = clip_x[name] / s_cols.to(device=clip_x[name].device, dtype=clip_x[name].dtype)
    clips = _clip_linears(state, clip_x, qargs, config, log, desc, progress)
    t_clip = time.perf_counter()

    # 4. quantize; measure the block output error of RTN and of the result
    qlinears = _quantize_linears(state, qargs, save_dtype)
    floats = _floats(state, qlinears, save_dtype)
    float_state = {k: v.detach() for k, v in block.state_dict().items()}
    rtn_q = _quantize_linears(float_state, qargs, save_dtype)
    rtn_out = run_block(block, inputs, effective_state(float_state, rtn_q, save_dtype))
    log["mse_rtn"] = _mse(rtn_out, float_out)
    del rtn_out
    quant_out = run_block(block, inputs, effective_state(state, qlinears, save_dtype))
    log["mse_awq"] = _mse(quant_out, float_out)
    outputs = quant_out if config.quant_input else float_out
    t_end = time.perf_counter()
    log["time_s"] = {
        "record": t_record - t0, "scale_search": t_scale - t_record, "clip_search": t_clip - t_scale,
        "quantize_and_eval": t_end - t_clip, "total": t_end - t0,
    }
    return BlockResult(qlinears, floats, searched, {k: v.cpu() for k, v in clips.items()}, log, outputs)


def _clip_linears(state: dict[str, torch.Tensor], clip_x: dict[str, torch.Tensor],
                  qargs: Mapping[str, QuantArgs | None],
                  config: AWQConfig, log: dict, desc: str, progress: bool) -> dict[str, torch.Tensor]:
    """Clip search of each linear in ``clip_x`` (its sub-sampled, scaled inputs); applies the clips to ``state``."""
    clips: dict[str, torch.Tensor] = {}
    for name in tqdm(list(clip_x), desc=f"{desc} clip", leave=False, disable=not (progress and clip_x)):
        w = state[f"{name}.weight"]
        clips[name] = search_clip(
            w, clip_x.pop(name), qargs[name], config.n_grid, config.max_shrink, config.clip_tokens, config.clip_batch
        )
        absmax = w.reshape(w.shape[0], clips[name].shape[1], -1).abs().amax(-1).float()
        log["clip"][name] = float((clips[name].float() / absmax.clamp(min=1e-12)).mean())  # mean kept fraction
        apply_clip(state, name, clips[name])
    return clips


def _floats(state: Mapping[str, torch.Tensor], qlinears: Mapping[str, QTensor], save_dtype: torch.dtype) -> dict:
    skip = {f"{n}.{p}" for n in qlinears for p in ("weight", "bias")}
    return {k: v.to(save_dtype).cpu() for k, v in state.items() if k not in skip}


def _search_group(
    block: nn.Module,
    group: ScaleGroup,
    rec: _Recorder,
    state: Mapping[str, torch.Tensor],
    qargs: Mapping[str, QuantArgs | None],
    config: AWQConfig,
    log: dict,
    desc: str,
    progress: bool = True,
) -> torch.Tensor:
    """Scale search of one group; appends its RTN-vs-AWQ losses to ``log["groups"]``."""
    t0 = time.perf_counter()
    inspect = block.get_submodule(group.inspect)
    calls = _group_calls(group, rec, config.chunk_tokens, config.search_tokens, config.seed)
    weights = {name: state[f"{name}.weight"] for name in group.linears}
    single = group.linears == (group.inspect,) and group.token_wise and isinstance(inspect, nn.Linear)
    search_rows = sum(_call_tokens(a, kw)[..., 0].numel() for a, kw in calls)
    loss_kind = "gram" if config.gram_loss and single and inspect.in_features < search_rows else "forward"
    if loss_kind == "gram":  # N K^2 per candidate instead of T K N: the same MSE, over every token
        g, g_tokens = gram(rec.x[group.linears[0]], config.chunk_tokens)
        w0 = weights[group.linears[0]]

        def loss_fn(candidates: Mapping[str, torch.Tensor]) -> float:
            return gram_mse(candidates[group.linears[0]].float() - w0.float(), g, g_tokens)
    else:
        org = [_first(inspect(*a, **kw)) for a, kw in calls]
        rel = {name: _relative(group.inspect, name) for name in group.linears}
        n_elems = sum(o.numel() for o in org)

        def loss_fn(candidates: Mapping[str, torch.Tensor]) -> float:
            override = {rel[name]: w for name, w in candidates.items()}
            sq = 0.0
            for (a, kw), o in zip(calls, org, strict=True):
                out = _first(functional_call(inspect, override, a, kw))
                sq += float((o.float() - out.float()).pow(2).sum())
            return sq / max(n_elems, 1)

    index = group.index()
    n_rows = None if index is None else int(index.max()) + 1
    x_mean = reduce_to_rows(act_mean(rec.x[group.linears[0]]), index, n_rows)
    w_mean = None
    qs = {name: qargs.get(name) for name in group.linears}
    if config.duo_scaling:
        gs = next((q.group_size for q in qs.values() if q is not None), -1)
        w_mean = reduce_to_rows(weight_mean(list(weights.values()), gs), index, n_rows)
    ratios = config.ratios
    step = COARSE_STEP if config.ratio_search == "coarse" else 1
    with tqdm(total=search_evaluations(len(ratios), step), desc=f"{desc} {group.name}", leave=False,
              disable=not progress) as bar:
        result = search_scales(loss_fn, weights, x_mean, qs, ratios, w_mean, index, bar.update, step)
    if config.duo_scaling:  # ratio 0 is not plain RTN under duo scaling: measure RTN itself
        ones = torch.ones_like(compute_scales(x_mean, 0.0))
        loss_rtn = float(search_scales(loss_fn, weights, ones, qs, [0.0], None, index).best_loss)
    else:
        loss_rtn = result.losses[0]
    log["groups"].append({
        "name": group.name, "prev_op": group.prev_op, "linears": list(group.linears), "ratio": result.ratio,
        "rtn_loss": loss_rtn, "awq_loss": result.best_loss, "losses": result.logged_losses,
        "loss": loss_kind, "search_tokens": g_tokens if loss_kind == "gram" else search_rows,
        "time_s": time.perf_counter() - t0,
    })
    return result.scales.to(x_mean.device)
