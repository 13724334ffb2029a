"""AWQ of the output head: the final RMSNorm -> ``lm_head`` as one more scale group, after the last decoder block.

The group is (prev op ``model.norm``, linears ``lm_head``, compared output: the logits): the scale search, the clip
search and the quantizer are the blocks' (:mod:`nvila_quant.quant.awq`), and the result is a
:class:`~nvila_quant.quant.block.BlockResult` whose names are the checkpoint's keys (``model.norm.weight``,
``lm_head``), saved in the work folder like a block's. The head is V x H (152k x 3584 on NVILA-8B), so memory and
time are bounded differently from a block:

- calibration: at most ``config.lm_head_tokens`` of the last block's output tokens, a seeded random subset; the
  scale statistic (mean |x| per channel) is taken over every token;
- output errors ``x (W - W')^T`` are computed a chunk of vocabulary rows at a time (tokens x rows <= 2^24 values),
  candidates ``Q(W s) / s`` per chunk too: tokens x vocab is never materialized;
- the clip search batches output rows (``clip_batch``) as for every linear, on <= ``clip_tokens`` tokens;
- the packed QTensor is built a chunk of rows at a time (rows quantize independently).
Peak memory is about twice the head in the compute dtype (the float head, kept to measure errors, and its scaled
copy) plus the packed result.

The logged errors compare the saved head (its norm weight rounded to the checkpoint dtype, its int4 weights
dequantized) and round to nearest with the float head on the sampled tokens: ``mse_*`` of the logits and ``kl_*``,
the mean next-token KL divergence (nats), computed with a streaming log-sum-exp over the row chunks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from nvila_quant.numerics.qtensor import QTensor
from nvila_quant.quant.awq import (
    COARSE_STEP,
    QuantArgs,
    apply_scales,
    clip_weight,
    grid_search,
    sample_tokens,
    scale_quantize,
    search_clip,
    search_evaluations,
    weight_mean,
)
from nvila_quant.quant.block import BlockResult
from nvila_quant.quant.config import AWQConfig
from nvila_quant.quant.lazy import HeadModule
from nvila_quant.quant.mappings import ScaleGroup

__all__ = ["HEAD_GROUP", "VOCAB_MULTIPLE", "head_rows", "quantize_head", "sample_tokens", "streaming_errors"]

HEAD_GROUP = ScaleGroup("lm_head", "model.norm", "norm", ("lm_head",), "lm_head")
# Rows of a quantized head are padded to this multiple: AutoAWQ packs 8 output rows per int32 (TinyChat 4), the CPU
# T16 kernels take N % 16 and the CUDA mma layout N % 32; vLLM pads its vocabulary to 64 too. NVILA's runtime
# vocabulary (151648 stored + 3 tokens added at load = 151651) fits none of them.
VOCAB_MULTIPLE = 64
_CHUNK_VALUES = 2**24  # tokens x rows per output-error chunk (64 MB in fp32)
_QUANT_ROWS = 8192  # rows per quantization chunk


def head_rows(vocab_size: int, tokenizer_size: int) -> int:
    """Rows of a quantized head: the runtime's vocabulary (the stored rows, grown to the tokenizer with its media
    tokens), rounded up to :data:`VOCAB_MULTIPLE`. A packed head cannot grow at load as a float one does, so the rows
    (mean rows, like the media tokens') are added before quantizing."""
    rows = max(int(vocab_size), int(tokenizer_size))
    return -(-rows // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _chunk_rows(n_tokens: int) -> int:
    return max(1, _CHUNK_VALUES // max(n_tokens, 1))


def _norm_mean(head: HeadModule, hidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean |norm(h)| per channel over every token of every sample. -> (H,) float32."""
    total, n = None, 0
    for h in hidden:
        x = head.model.norm(h).reshape(-1, h.shape[-1])  # (T, H)
        part = x.abs().float().sum(0)
        total = part if total is None else total + part
        n += x.shape[0]
    return total / max(n, 1)


def _chunked_weight_mean(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """:func:`weight_mean` of a (V, H) weight, a chunk of rows at a time. -> (H,) float32."""
    total = torch.zeros(w.shape[1], dtype=torch.float32, device=w.device)
    for r0 in range(0, w.shape[0], _QUANT_ROWS):
        chunk = w[r0:r0 + _QUANT_ROWS]
        total += weight_mean([chunk], group_size) * chunk.shape[0]
    return total / w.shape[0]


def _scaled_loss(x: torch.Tensor, w: torch.Tensor, s_cols: torch.Tensor, q: QuantArgs) -> float:
    """fp32 MSE of the logits when ``w`` is replaced by Q(W s) / s: mean of (x (W - Q(W s)/s)^T)^2, a chunk of rows
    at a time. x: (T, H), w: (V, H), s_cols: (H,)."""
    rows = _chunk_rows(x.shape[0])
    sq = 0.0
    for r0 in range(0, w.shape[0], rows):
        wc = w[r0:r0 + rows]  # (R, H)
        err = x @ (wc - scale_quantize(wc, s_cols, q)).T  # (T, R)
        sq += float(err.float().pow(2).sum())
    return sq / (x.shape[0] * w.shape[0])


def _quantize_rows(w: torch.Tensor, q: QuantArgs, save_dtype: torch.dtype) -> QTensor:
    """Round to nearest of a (V, H) weight, a chunk of rows at a time (the same codes as one QTensor.from_float)."""
    parts = [QTensor.from_float(w[r0:r0 + _QUANT_ROWS].float(), q.bits, q.group_size, q.zero_point,
                                scale_dtype=save_dtype).to("cpu") for r0 in range(0, w.shape[0], _QUANT_ROWS)]
    return QTensor(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                   torch.cat([p.zero for p in parts]), q.bits, q.group_size, not q.zero_point)


def _rows_of(qt: QTensor, dtype: torch.dtype, device: torch.device) -> Callable[[int, int], torch.Tensor]:
    """Rows r0:r1 of a QTensor, dequantized. -> (r1 - r0, H)."""
    def rows(r0: int, r1: int) -> torch.Tensor:
        part = QTensor(qt.q[r0:r1], qt.scale[r0:r1], qt.zero[r0:r1], qt.bits, qt.group_size, qt.symmetric)
        return part.to(device).dequantize(dtype)

    return rows


class _LogSumExp:
    """Running max and sum of exp over column chunks of (T, R) logits: log sum_v exp(l_v) per token."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.m = torch.full((n,), -math.inf, device=device)
        self.z = torch.zeros(n, device=device)

    def update(self, logits: torch.Tensor) -> torch.Tensor:
        """Fold in a chunk (T, R); returns the factor earlier sums were rescaled by (T,)."""
        m = torch.maximum(self.m, logits.max(1).values)
        rescale = torch.exp(self.m - m)
        self.z = self.z * rescale + torch.exp(logits - m[:, None]).sum(1)
        self.m = m
        return rescale

    def value(self) -> torch.Tensor:
        return self.m + self.z.log()


@torch.no_grad()
def streaming_errors(
    head: HeadModule, hidden: torch.Tensor,
    candidates: Mapping[str, tuple[torch.Tensor, Callable[[int, int], torch.Tensor]]],
) -> dict[str, dict[str, float]]:
    """Logit MSE and mean next-token KL(float || candidate) of each candidate head on ``hidden`` (T, H).

    ``candidates``: name -> (its norm weight (H,), rows(r0, r1) -> its head rows (R, H)). The float head is
    ``head``'s own. Computed a chunk of rows at a time with streaming log-sum-exps:
    KL = sum_v p_v (l_v - l'_v) - lse(l) + lse(l'), p = softmax(l).
    """
    w = head.lm_head.weight  # (V, H)
    norm = head.model.norm
    x_ref = norm(hidden)  # (T, H)
    xs = {name: functional_call(norm, {"weight": nw.to(w)}, (hidden,)) for name, (nw, _) in candidates.items()}
    t, v = hidden.shape[0], w.shape[0]
    ref = _LogSumExp(t, w.device)
    lse = {name: _LogSumExp(t, w.device) for name in candidates}
    cross = {name: torch.zeros(t, device=w.device) for name in candidates}  # sum_v exp(l_v - m) (l_v - l'_v)
    sq = dict.fromkeys(candidates, 0.0)
    rows = _chunk_rows(t)
    for r0 in range(0, v, rows):
        r1 = min(r0 + rows, v)
        logits = (x_ref @ w[r0:r1].T).float()  # (T, R)
        rescale = ref.update(logits)
        p = torch.exp(logits - ref.m[:, None])
        for name, (_, rows_of) in candidates.items():
            cand = (xs[name] @ rows_of(r0, r1).to(w).T).float()  # (T, R)
            diff = logits - cand
            sq[name] += float(diff.pow(2).sum())
            cross[name] = cross[name] * rescale + (p * diff).sum(1)
            lse[name].update(cand)
    out = {}
    for name in candidates:
        kl = (cross[name] / ref.z - ref.value() + lse[name].value()).clamp(min=0)  # (T,)
        out[name] = {"mse": sq[name] / (t * v), "kl": float(kl.mean())}
    return out


def _kept_fraction(w: torch.Tensor, max_val: torch.Tensor) -> float:
    """Mean of max_val / absmax over (row, group), a chunk of rows at a time. w: (V, H), max_val: (V, H/G)."""
    total = 0.0
    for r0 in range(0, w.shape[0], _QUANT_ROWS):
        chunk = w[r0:r0 + _QUANT_ROWS]
        absmax = chunk.reshape(chunk.shape[0], max_val.shape[1], -1).abs().amax(-1).float()  # (R, H/G)
        total += float((max_val[r0:r0 + _QUANT_ROWS].float() / absmax.clamp(min=1e-12)).sum())
    return total / max_val.numel()


def _clip_in_place(w: torch.Tensor, max_val: torch.Tensor) -> None:
    """:func:`~nvila_quant.quant.awq.apply_clip`'s arithmetic, a chunk of rows at a time, in place."""
    for r0 in range(0, w.shape[0], _QUANT_ROWS):
        w[r0:r0 + _QUANT_ROWS] = clip_weight(w[r0:r0 + _QUANT_ROWS], max_val[r0:r0 + _QUANT_ROWS].to(w.device))


@torch.no_grad()
def quantize_head(
    head: HeadModule,
    hidden: Sequence[torch.Tensor] | None,
    q: QuantArgs,
    config: AWQConfig,
    save_dtype: torch.dtype,
    progress: bool = True,
) -> BlockResult:
    """Quantize ``head.lm_head`` (scales folded into ``head.model.norm``); ``hidden``: the last decoder block's
    outputs [(1, T, H)], None for round to nearest without calibration (no errors logged)."""
    t0 = time.perf_counter()
    norm_w = head.model.norm.weight.detach()  # (H,)
    w = head.lm_head.weight.detach()  # (V, H), the float head (never modified)
    log: dict[str, Any] = {"groups": [], "clip": {}, "rows": int(w.shape[0])}
    if hidden is None:
        qt = _quantize_rows(w, q, save_dtype)
        log["time_s"] = {"total": time.perf_counter() - t0}
        return BlockResult({"lm_head": qt}, {"model.norm.weight": norm_w.to(save_dtype).cpu()}, log=log)

    h = sample_tokens(hidden, config.lm_head_tokens, config.seed)  # (T', H)
    log["tokens"] = int(h.shape[0])
    state = {"model.norm.weight": norm_w, "lm_head.weight": w}
    scales: list[tuple[ScaleGroup, torch.Tensor]] = []
    clips: dict[str, torch.Tensor] = {}
    t_search = t_clip = time.perf_counter()
    if config.method == "awq":
        x = head.model.norm(h)  # (T', H)
        x_mean = _norm_mean(head, hidden)
        w_mean = _chunked_weight_mean(w, q.group_size) if config.duo_scaling else None

        def loss_of_scales(s: torch.Tensor) -> float:
            return _scaled_loss(x, w, s.to(w.device), q)

        step = COARSE_STEP if config.ratio_search == "coarse" else 1
        with tqdm(total=search_evaluations(len(config.ratios), step), desc="lm_head scales", leave=False,
                  disable=not progress) as bar:
            result = grid_search(loss_of_scales, x_mean, config.ratios, w_mean, bar.update, step)
        # ratio 0 is plain RTN, except under duo scaling: measure RTN itself there
        rtn_loss = loss_of_scales(torch.ones_like(x_mean)) if config.duo_scaling else result.losses[0]
        log["groups"].append({
            "name": HEAD_GROUP.name, "prev_op": HEAD_GROUP.prev_op, "linears": list(HEAD_GROUP.linears),
            "ratio": result.ratio, "rtn_loss": rtn_loss, "awq_loss": result.best_loss, "losses": result.logged_losses,
            "time_s": time.perf_counter() - t0,
        })
        s = result.scales.to(w.device)
        apply_scales(state, HEAD_GROUP, s)  # new tensors: norm / s, W * s
        scales.append((HEAD_GROUP, s))
        t_search = time.perf_counter()
        if config.clip:
            scaled = state["lm_head.weight"]
            xs = x / s.to(x.dtype)  # the scaled head's inputs
            max_val = search_clip(scaled, xs, q, config.n_grid, config.max_shrink, config.clip_tokens,
                                  config.clip_batch)  # (V, H/G)
            log["clip"]["lm_head"] = _kept_fraction(scaled, max_val)
            del xs
            _clip_in_place(scaled, max_val)
            clips["lm_head"] = max_val.cpu()
        t_clip = time.perf_counter()

    qt = _quantize_rows(state["lm_head.weight"], q, save_dtype)
    floats = {"model.norm.weight": state["model.norm.weight"].to(save_dtype).cpu()}
    del state
    rtn = (norm_w, lambda r0, r1: QTensor.from_float(w[r0:r1].float(), q.bits, q.group_size, q.zero_point,
                                                        scale_dtype=save_dtype).dequantize(w.dtype))
    saved = (floats["model.norm.weight"], _rows_of(qt, w.dtype, w.device))
    errors = streaming_errors(head, h, {"rtn": rtn, "awq": saved})
    log.update({"mse_rtn": errors["rtn"]["mse"], "mse_awq": errors["awq"]["mse"], "kl_rtn": errors["rtn"]["kl"],
                "kl_awq": errors["awq"]["kl"]})
    t_end = time.perf_counter()
    log["time_s"] = {"scale_search": t_search - t0, "clip_search": t_clip - t_search,
                     "quantize_and_eval": t_end - t_clip, "total": t_end - t0}
    return BlockResult({"lm_head": qt}, floats, scales, clips, log)
