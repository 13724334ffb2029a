"""What a benchmark harness asks of a model, answered by the NVILA runtime: one prompt at a time (batch 1).

Nothing here imports a harness: :class:`Responder` takes a task's context string and visuals (PIL images, image or
video paths) and returns a generated answer or the log-likelihood of a continuation. The lmms-eval adapter
(:mod:`nvila_quant.eval.adapter`) is a thin loop over it.

Prompts are NVILA's: one user turn in the checkpoint's chat template, media before the text, or at the ``<image>`` /
``<vila/video>`` markers the context holds (VILA's own placement).
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from transformers import GenerationConfig

from nvila_quant.errors import ConfigError, MediaError
from nvila_quant.model import Image, NVILAQwen2, Video
from nvila_quant.model.media import VIDEO_EXTENSIONS
from nvila_quant.model.tokenizer import MEDIA_TOKENS

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "LL_REDUCTIONS", "Responder", "load_responder", "prompt_parts"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256  # when a task sets none (lmms-eval's own adapters use 128-1024)
LL_REDUCTIONS = ("sum", "mean")
_MARKERS = re.compile("(" + "|".join(re.escape(t) for t in MEDIA_TOKENS.values()) + ")")


def _as_media(visual: Any) -> Image | Video | PIL.Image.Image:
    """A harness visual as a prompt part: a PIL image, an image path, or a video (file or folder of frames)."""
    if isinstance(visual, PIL.Image.Image | Image | Video):
        return visual
    if isinstance(visual, str | os.PathLike):
        path = Path(visual)
        return Video(path) if path.suffix.lower() in VIDEO_EXTENSIONS or path.is_dir() else Image(path)
    raise MediaError(f"unsupported visual of type {type(visual).__name__} (NVILA takes images and videos; "
                     "audio and other inputs are not supported)")


def prompt_parts(context: str, visuals: Sequence[Any] = ()) -> list:
    """NVILA's prompt parts for a context string and its visuals.

    Each ``<image>`` / ``<vila/video>`` marker in ``context`` takes the next visual of that kind, in order; visuals
    left without a marker go before the text (NVILA's default placement), markers left without a visual are dropped
    with a warning.
    """
    media = [_as_media(v) for v in visuals]
    queues: dict[str, list] = {
        "image": [m for m in media if not isinstance(m, Video)],
        "video": [m for m in media if isinstance(m, Video)],
    }
    kind_of = {token: kind for kind, token in MEDIA_TOKENS.items()}
    pieces = _MARKERS.split(context)
    n_markers = {kind: pieces.count(token) for kind, token in MEDIA_TOKENS.items()}
    lead = [m for kind, items in queues.items() for m in items[n_markers[kind]:]]
    body: list = []
    for piece in pieces:
        kind = kind_of.get(piece)
        if kind is None:
            if piece:
                body.append(piece)
        elif queues[kind]:
            body.append(queues[kind].pop(0))
        else:
            logger.warning("the context has more %s markers than %ss; the extra markers are dropped", piece, kind)
    return lead + body


@dataclass
class Responder:
    """Greedy answers and log-likelihoods of one loaded model.

    Args:
        model: a loaded runtime model (float or quantized, any vision backend).
        max_new_tokens: answer length when a request gives none.
        ll_reduction: "sum" (the continuation's negative log-likelihood, lm-eval's quantity) or "mean" (per token, as
            lmms-eval's LLaVA adapters return).
    """

    model: NVILAQwen2
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    ll_reduction: str = "sum"
    _prefix_key: Hashable | None = field(default=None, init=False, repr=False)
    _prefix: tuple[int, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.ll_reduction not in LL_REDUCTIONS:
            raise ConfigError(f"ll_reduction must be one of {', '.join(LL_REDUCTIONS)}, got {self.ll_reduction!r}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def generation_config(self, gen_kwargs: Mapping[str, Any] | None = None) -> GenerationConfig:
        """The checkpoint's generation config with a request's settings: greedy unless the request asks to sample
        (``do_sample`` with a temperature > 0); ``max_new_tokens`` from the request or :attr:`max_new_tokens`."""
        kw = dict(gen_kwargs or {})
        config = copy.deepcopy(self.model.default_generation_config)
        config.max_new_tokens = int(kw.get("max_new_tokens") or self.max_new_tokens)
        config.max_length = None
        sample = bool(kw.get("do_sample")) and float(kw.get("temperature") or 0) > 0
        config.do_sample = sample
        config.temperature = float(kw["temperature"]) if sample else None
        config.top_p = kw.get("top_p") if sample else None
        config.top_k = None
        config.num_beams = int(kw.get("num_beams") or 1)
        return config

    @torch.inference_mode()
    def generate(self, context: str, visuals: Sequence[Any] = (), gen_kwargs: Mapping[str, Any] | None = None) -> str:
        """The model's answer (``generate_content``), cut at the first of the request's ``until`` strings."""
        self._prefix_key = None  # generation may reset the decode session that holds the log-likelihood prefix
        text = self.model.generate_content(prompt_parts(context, visuals), self.generation_config(gen_kwargs))
        until = (gen_kwargs or {}).get("until") or []
        for stop in [until] if isinstance(until, str) else until:
            if stop:
                text = text.split(stop)[0]
        return text

    @torch.inference_mode()
    def loglikelihood(self, context: str, continuation: str, visuals: Sequence[Any] = (),
                      prefix_key: Hashable | None = None) -> tuple[float, bool]:
        """(negative log-likelihood of ``continuation``, whether greedy decoding would produce it).

        The prefix is the prompt ``generate`` would answer (the user turn with its media, then the assistant
        prompt); the continuation's tokens (tokenized on their own, no special tokens) are the start of the answer.
        The first number is the loss lmms-eval's ``multiple_choice`` takes the argmin of: summed over the
        continuation's tokens, or averaged with ``ll_reduction="mean"``. Calls with the same ``prefix_key`` (the
        choices of one question) run the prefix once and continue its KV cache (``stream_gen``).
        """
        model = self.model
        if prefix_key is None or prefix_key != self._prefix_key:
            self._prefix_key = None
            input_ids, media, media_config = model.prompt_inputs(prompt_parts(context, visuals) or [""])
            last, n_prefix = model.stream_gen(input_ids, media, media_config, start_pos=0, logits_to_keep=1)
            self._prefix = (n_prefix, last[0].float())  # positions, logits (1, V) predicting the first answer token
            self._prefix_key = prefix_key
        n_prefix, logits = self._prefix
        targets = torch.tensor(model.tokenizer(continuation, add_special_tokens=False).input_ids, dtype=torch.long,
                               device=logits.device)
        k = targets.numel()
        if k == 0:
            return 0.0, True
        if k > 1:  # the positions after the first answer token: (K-1, V)
            more, _ = model.stream_gen(targets[None, :-1], start_pos=n_prefix, chunk_prefilling=True)
            logits = torch.cat([logits, more[0].float()])
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]  # (K,)
        nll = -float(logprobs.sum()) / (k if self.ll_reduction == "mean" else 1)
        return nll, bool((logits.argmax(-1) == targets).all())


def load_responder(
    pretrained: str | os.PathLike,
    dtype: str | None = None,
    device: str | None = None,
    vision_backend: str = "torch",
    onnx_dir: str | os.PathLike | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ll_reduction: str = "sum",
) -> Responder:
    """Load a checkpoint (float or quantized, either layout) behind a :class:`Responder`; ``onnx_dir`` (an
    ``nvila-export onnx`` folder) runs the vision tower through onnxruntime."""
    if onnx_dir is not None and vision_backend == "torch":
        vision_backend = "onnx"
    model = NVILAQwen2.load_pretrained(pretrained, torch_dtype=dtype, device=device, vision_backend=vision_backend,
                                       onnx_dir=onnx_dir)
    return Responder(model, max_new_tokens=max_new_tokens, ll_reduction=ll_reduction)
