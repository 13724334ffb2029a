"""AWQ numerics as pure functions: statistics, scale search, clip search, and applying both.

Reference behaviour (llm-awq, ``../shared/reference/awq.md``):
    x_mean = mean |x| per input channel;  s = x_mean^r clamped to 1e-4, s /= sqrt(max(s) * min(s))
    r in {0, 1/20, ..., 19/20};  candidate W' = Q(W * s) / s;  keep the r of least fp32 output MSE
    clip: max_val = absmax * (1 - i/20), i = 0..9, per (output channel, group) argmin of the mean squared
    error of the group's partial dot products over <= ~512 sub-sampled tokens.
Options: duo scaling (s = x_mean^r / (w_mean^(1-r) + 1e-4), AutoAWQ), ratio 1.0, GQA index maps; cheaper searches
of the same quantities: a coarse-to-fine ratio grid, losses on a seeded token subset, and the Gram-matrix form of a
single linear's output MSE.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from nvila_quant.model.projector import ScaledActivation, wrap_scaled_activations
from nvila_quant.numerics.quantizer import pseudo_quantize
from nvila_quant.quant.mappings import ScaleGroup

__all__ = [
    "COARSE_STEP",
    "NO_CLIP_PATTERNS",
    "QuantArgs",
    "ScaleSearchResult",
    "ScaledActivation",
    "act_mean",
    "apply_clip",
    "apply_scales",
    "clip_weight",
    "coarse_indices",
    "compute_scales",
    "gram",
    "gram_mse",
    "grid_search",
    "reduce_to_rows",
    "sample_tokens",
    "scale_quantize",
    "search_clip",
    "search_evaluations",
    "search_scales",
    "skip_clip",
    "weight_mean",
    "wrap_scaled_activations",
]

# the reference never clips these: q.k amplifies their error
NO_CLIP_PATTERNS = ("q_", "k_", "query", "key", "Wqkv")
COARSE_STEP = 4  # ratio_search="coarse": every 4th grid ratio first (0, 0.2, ..., 1.0 on the default grid)


@dataclass(frozen=True)
class QuantArgs:
    """The weight quantizer of one linear (group_size -1 = per output channel)."""

    bits: int = 4
    group_size: int = 128
    zero_point: bool = True

    def fake(self, w: torch.Tensor) -> torch.Tensor:
        """Q(w) dequantized, in w's dtype (the reference's ``pseudo_quantize_tensor``)."""
        return pseudo_quantize(w, self.bits, self.group_size, self.zero_point)


# ---------------------------------------------------------------------------------------------- statistics
def act_mean(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean |x| per channel over every token of every tensor. xs: [(..., C)] -> (C,) float32."""
    c = xs[0].shape[-1]
    total = torch.zeros(c, dtype=torch.float32, device=xs[0].device)
    n = 0
    for x in xs:
        flat = x.reshape(-1, c)
        total += flat.abs().float().sum(0)
        n += flat.shape[0]
    return total / max(n, 1)


def weight_mean(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """AutoAWQ's duo-scaling statistic: |W| normalised by its group absmax, averaged over output rows.

    weights: [(N_i, K)] -> (K,) float32.
    """
    w = torch.cat([x.float() for x in weights], dim=0)  # (N, K)
    g = w.shape[1] if group_size == -1 else group_size
    grouped = w.reshape(-1, g).abs()
    grouped = grouped / grouped.amax(dim=1, keepdim=True).clamp(min=1e-12)
    return grouped.reshape(w.shape).mean(0)


def sample_tokens(hidden: Sequence[torch.Tensor], n_tokens: int, seed: int) -> torch.Tensor:
    """At most ``n_tokens`` rows of the concatenated hidden states [(..., H)], a seeded random subset kept in order,
    without materializing the concatenation. -> (T', H)."""
    flats = [h.reshape(-1, h.shape[-1]) for h in hidden]
    total = sum(f.shape[0] for f in flats)
    if total <= n_tokens:
        return torch.cat(flats)
    picked = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n_tokens].sort().values
    out, offset = [], 0
    for f in flats:
        mine = picked[(picked >= offset) & (picked < offset + f.shape[0])] - offset
        out.append(f[mine.to(f.device)])
        offset += f.shape[0]
    return torch.cat(out)


def gram(xs: Sequence[torch.Tensor], chunk: int = 4096) -> tuple[torch.Tensor, int]:
    """X^T X over every token of xs [(..., K)] in fp32, a chunk of tokens at a time. -> ((K, K), tokens)."""
    k = xs[0].shape[-1]
    g = torch.zeros(k, k, dtype=torch.float32, device=xs[0].device)
    n = 0
    for x in xs:
        for c in x.reshape(-1, k).split(chunk):
            cf = c.float()
            g.addmm_(cf.T, cf)
            n += c.shape[0]
    return g, n


def gram_mse(delta: torch.Tensor, g: torch.Tensor, tokens: int) -> float:
    """Mean over tokens and outputs of (x delta^T)^2 from the Gram matrix: sum((delta G) * delta) / (T N).
    delta: (N, K) weight error, g: (K, K) = X^T X of T tokens."""
    d = delta.float()
    return float(((d @ g) * d).sum()) / max(tokens * d.shape[0], 1)


def reduce_to_rows(stat: torch.Tensor, index: torch.Tensor | None, n_rows: int | None = None) -> torch.Tensor:
    """Average a per-input-column statistic over the columns each prev-op row feeds (GQA); identity without index.

    stat: (C_cols,), index: (C_cols,) -> (n_rows,)."""
    if index is None:
        return stat
    index = index.to(stat.device)
    n_rows = int(index.max()) + 1 if n_rows is None else n_rows
    total = torch.zeros(n_rows, dtype=stat.dtype, device=stat.device).index_add_(0, index, stat)
    count = torch.zeros(n_rows, dtype=stat.dtype, device=stat.device).index_add_(0, index, torch.ones_like(stat))
    return total / count.clamp(min=1)


def compute_scales(x_mean: torch.Tensor, ratio: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's candidate scales for one grid ratio (duo scaling when ``w_mean`` is given). (C,) -> (C,)."""
    if w_mean is None:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    else:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def _cols(s: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return s if index is None else s[index.to(s.device)]


def scale_quantize(w: torch.Tensor, s_cols: torch.Tensor, q: QuantArgs) -> torch.Tensor:
    """Candidate weight Q(W * s) / s. w: (N, K), s_cols: (K,) -> (N, K) in w's dtype."""
    s = s_cols.view(1, -1).to(w.dtype)
    return q.fake(w * s) / s


# ---------------------------------------------------------------------------------------------- scale search
@dataclass
class ScaleSearchResult:
    """Best scales (per prev-op output channel, float32), the ratio that gave them and every ratio's loss."""

    scales: torch.Tensor
    ratio: float
    losses: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    evaluated: list[bool] | None = None  # which ratios the search evaluated (None: all)

    @property
    def best_loss(self) -> float:
        return min(x for x in self.losses if not math.isnan(x))

    @property
    def logged_losses(self) -> list[float | None]:
        """The losses for a JSON log: None for a ratio the search did not evaluate (NaN stays NaN in the grid)."""
        if self.evaluated is None:
            return list(self.losses)
        return [x if ok else None for x, ok in zip(self.losses, self.evaluated, strict=True)]


def coarse_indices(n: int, step: int) -> list[int]:
    """The first pass of the coarse-to-fine search: every ``step``-th of n grid indices, and the last."""
    return sorted(set(range(0, n, step)) | {n - 1})


def search_evaluations(n: int, step: int) -> int:
    """At most how many losses a search of n ratios evaluates (step 1: the whole grid)."""
    return n if step <= 1 else min(n, len(coarse_indices(n, step)) + 2 * (step - 1))


def grid_search(
    loss_of_scales: Callable[[torch.Tensor], float],
    x_mean: torch.Tensor,
    ratios: Sequence[float],
    w_mean: torch.Tensor | None = None,
    progress: Callable[[], None] | None = None,
    coarse_step: int = 1,
) -> ScaleSearchResult:
    """The ratio grid: ``loss_of_scales(s)`` for each ratio's :func:`compute_scales` (s per prev-op output channel);
    the first minimum wins (strict <), as in the reference.

    ``coarse_step`` > 1: the coarse-to-fine search: the :func:`coarse_indices` first, then every ratio strictly
    between the best one's coarse neighbours; the first minimum (in grid order) of the evaluated ratios wins, and
    the ratios never evaluated have a NaN loss."""
    best, best_ratio, best_scales = float("inf"), -1.0, None
    evaluated: list[bool] | None = None
    if coarse_step > 1:
        n = len(ratios)
        losses = [math.nan] * n
        evaluated = [False] * n

        def visit(i: int) -> None:
            losses[i] = float(loss_of_scales(compute_scales(x_mean, ratios[i], w_mean)))
            evaluated[i] = True
            if progress is not None:
                progress()

        def rank(i: int) -> tuple:  # the first minimum in grid order; NaN last
            return (math.isnan(losses[i]), losses[i], i)

        coarse = coarse_indices(n, coarse_step)
        for i in coarse:
            visit(i)
        at = coarse.index(min(coarse, key=rank))
        lo, hi = coarse[max(at - 1, 0)], coarse[min(at + 1, len(coarse) - 1)]
        for i in range(lo + 1, hi):
            if not evaluated[i]:
                visit(i)
        i = min((j for j in range(n) if evaluated[j]), key=rank)
        if not math.isnan(losses[i]) and losses[i] < best:
            best, best_ratio, best_scales = losses[i], ratios[i], compute_scales(x_mean, ratios[i], w_mean)
    else:
        losses = []
        for ratio in ratios:
            s = compute_scales(x_mean, ratio, w_mean)
            loss = float(loss_of_scales(s))
            losses.append(loss)
            if loss < best:
                best, best_ratio, best_scales = loss, ratio, s
            if progress is not None:
                progress()
    if best_scales is None:
        raise FloatingPointError(f"scale search found no finite loss (losses: {losses})")
    if torch.isnan(best_scales).any():
        raise FloatingPointError("scale search produced NaN scales")
    return ScaleSearchResult(best_scales.float(), best_ratio, losses, list(ratios), evaluated)


def search_scales(
    loss_fn: Callable[[dict[str, torch.Tensor]], float],
    weights: Mapping[str, torch.Tensor],
    x_mean: torch.Tensor,
    q: QuantArgs | Mapping[str, QuantArgs | None],
    ratios: Sequence[float],
    w_mean: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
    progress: Callable[[], None] | None = None,
    coarse_step: int = 1,
) -> ScaleSearchResult:
    """Grid search of the AWQ scale ratio (:func:`grid_search`, ``coarse_step`` as there).

    ``loss_fn(candidates)`` returns the fp32 MSE of the inspected module's output when the group's linears
    use ``candidates`` ({name: (N, K) weight}); ``x_mean``/``w_mean`` are per prev-op output channel;
    ``index`` maps linear input columns to those channels (GQA); ``q`` may give each linear its own
    quantizer (None: the linear stays in float).
    """
    qs = q if isinstance(q, Mapping) else {name: q for name in weights}

    def loss_of_scales(s: torch.Tensor) -> float:
        s_cols = _cols(s, index)
        candidates = {
            name: w if qs[name] is None else scale_quantize(w, s_cols, qs[name]) for name, w in weights.items()
        }
        return float(loss_fn(candidates))

    return grid_search(loss_of_scales, x_mean, ratios, w_mean, progress, coarse_step)


# ---------------------------------------------------------------------------------------------- clip search
def skip_clip(name: str) -> bool:
    """The reference skips clipping q/k projections."""
    return any(p in name for p in NO_CLIP_PATTERNS)


@torch.no_grad()
def search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    q: QuantArgs,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_tokens: int = 512,
    oc_batch: int = 256,
) -> torch.Tensor:
    """Per (output channel, group) clipping threshold of minimum output error.

    w: (N, K) weight (already scaled); x: (T, K) its inputs (already divided by the scales), every token.
    Tokens are sub-sampled with stride max(1, T // n_tokens). Returns max_val (N, K/G) in w's dtype.
    """
    n, k = w.shape
    g = k if q.group_size == -1 else q.group_size
    x = x.reshape(-1, k)
    x = x[:: max(1, x.shape[0] // n_tokens)]
    xg = x.to(w.dtype).reshape(x.shape[0], k // g, g)  # (T', ng, G)
    best_all = []
    for start in range(0, n, oc_batch):
        wb = w[start : start + oc_batch].reshape(-1, k // g, g)  # (b, ng, G)
        org_max = wb.abs().amax(dim=-1, keepdim=True)  # (b, ng, 1)
        best = org_max.clone()
        min_err = torch.full_like(org_max, 1e9, dtype=torch.float32)
        org_out = torch.einsum("bgk,tgk->btg", wb, xg)  # (b, T', ng)
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            cur = torch.clamp(wb, -max_val, max_val)
            qw = q.fake(cur.reshape(-1, k)).reshape(cur.shape)
            cur_out = torch.einsum("bgk,tgk->btg", qw, xg)
            err = (cur_out - org_out).float().pow(2).mean(dim=1).unsqueeze(-1)  # (b, ng, 1)
            better = err < min_err
            min_err[better] = err[better]
            best[better] = max_val[better]
        best_all.append(best.squeeze(-1))
    return torch.cat(best_all, dim=0)


def clip_weight(w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """Clamp each (output channel, group) of w to [-max_val, max_val]. w: (N, K), max_val: (N, K/G)."""
    n, k = w.shape
    mv = max_val.to(w.dtype).unsqueeze(-1)  # (N, ng, 1)
    return torch.clamp(w.reshape(n, max_val.shape[1], -1), -mv, mv).reshape(n, k)


# ---------------------------------------------------------------------------------------------- applying
def apply_scales(state: dict[str, torch.Tensor], group: ScaleGroup, scales: torch.Tensor, prefix: str = "") -> None:
    """Fold a group's scales into a state dict (new tensors, same keys; function preserving).

    norm prev op: weight (and bias) / s; linear prev op: output rows (and bias) / s; act prev op: the
    ScaledActivation's ``scales`` * s (act(x) / scales); next linears: input columns * s.
    Arithmetic in float32, results in each tensor's dtype.
    """
    s = scales.float()
    prev = f"{prefix}{group.prev_op}"

    def put(key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        t = state[key]
        state[key] = fn(t.float().to(s.device)).to(device=t.device, dtype=t.dtype)

    if group.prev_kind == "norm":
        put(f"{prev}.weight", lambda t: t / s)
        if f"{prev}.bias" in state:
            put(f"{prev}.bias", lambda t: t / s)
    elif group.prev_kind == "linear":
        put(f"{prev}.weight", lambda t: t / s.view(-1, 1))
        if f"{prev}.bias" in state:
            put(f"{prev}.bias", lambda t: t / s)
    elif group.prev_kind == "act":
        key = f"{prev}.scales"
        if key not in state:
            raise KeyError(f"{key} missing: wrap the activation with wrap_scaled_activations first")
        put(key, lambda t: t * s)
    else:
        raise ValueError(f"unknown prev_kind {group.prev_kind!r}")
    s_cols = _cols(s, group.index())
    for name in group.linears:
        put(f"{prefix}{name}.weight", lambda t: t * s_cols.view(1, -1))


def apply_clip(state: dict[str, torch.Tensor], name: str, max_val: torch.Tensor) -> None:
    key = f"{name}.weight"
    state[key] = clip_weight(state[key], max_val.to(state[key].device))
