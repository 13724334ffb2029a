"""The lmms-eval model ``nvila_quant``: NVILA checkpoints (float or quantized, either layout, any backend) in the
harness, batch 1 and greedy by default.

    python -m lmms_eval --model nvila_quant --model_args pretrained=DIR,dtype=bf16 --tasks mmmu_val

Registered through the entry-point group ``lmms_eval.models`` (:func:`nvila_quant.eval.plugin.manifest`). Model
arguments: ``pretrained`` (checkpoint folder), ``dtype`` (fp32|fp16|bf16; default the checkpoint's), ``device``,
``vision_backend`` (torch|onnx) and ``onnx_dir`` (an ``nvila-export onnx`` folder), ``max_new_tokens`` (when a task
gives none), ``ll_reduction`` (sum|mean), ``name`` (progress-bar label). Requests are answered by
:class:`~nvila_quant.eval.responder.Responder`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmms_eval.api import instance as _instance
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

from nvila_quant.errors import ConfigError
from nvila_quant.eval.responder import DEFAULT_MAX_NEW_TOKENS, Responder, load_responder

__all__ = ["NVILAQuant"]


def _pair(nll: float, greedy: bool) -> Any:
    """A log-likelihood answer as the evaluator keeps it. lmms-eval 0.7 passes every response through
    ``unwrap_generation_output``, which turns a bare ``(float, bool)`` into its ``str()`` (breaking
    ``multiple_choice``); the text of a ``GenerationResult`` passes through unchanged."""
    wrapper = getattr(_instance, "GenerationResult", None)
    return (nll, greedy) if wrapper is None else wrapper(text=(nll, greedy))


def _flat(visuals: Any) -> list:
    """A task's ``doc_to_visual`` output (None, one visual, a list, or a list of lists) as one list."""
    if visuals is None:
        return []
    if not isinstance(visuals, list | tuple):
        return [visuals]
    return [v for item in visuals for v in (item if isinstance(item, list | tuple) else [item])]


class NVILAQuant(lmms):
    """lmms-eval's view of an NVILA checkpoint loaded by this package's runtime."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        vision_backend: str = "torch",
        onnx_dir: str | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        ll_reduction: str = "sum",
        name: str | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        responder: Responder | None = None,
        quiet: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ConfigError(f"unknown model_args for nvila_quant: {', '.join(sorted(kwargs))} (known: pretrained, "
                              "dtype, device, vision_backend, onnx_dir, max_new_tokens, ll_reduction, name)")
        if str(batch_size or 1) not in ("1", "auto"):
            raise ConfigError(f"nvila_quant answers one request at a time: batch_size must be 1, got {batch_size}")
        if responder is None:
            if not pretrained:
                raise ConfigError("nvila_quant needs model_args pretrained=DIR (an NVILA checkpoint folder)")
            responder = load_responder(pretrained, dtype=dtype, device=device, vision_backend=vision_backend,
                                       onnx_dir=onnx_dir, max_new_tokens=int(max_new_tokens),
                                       ll_reduction=ll_reduction)
        self.responder = responder
        self.name = name or (Path(pretrained).name if pretrained else "nvila")
        self.quiet = quiet in (True, "true", "True", "1")

    # lmms-eval reads these
    @property
    def batch_size(self) -> int:
        return 1

    @property
    def device(self) -> Any:
        return self.responder.model.device

    def _visuals(self, doc_to_visual: Callable | None, doc_id: int, task: str, split: str) -> list:
        if doc_to_visual is None:
            return []
        return _flat(doc_to_visual(self.task_dict[task][split][doc_id]))

    def _each(self, requests: list[Instance], kind: str, answer: Callable[[tuple], Any]) -> list:
        """``answer(args)`` for each request in order, with one progress bar per task."""
        out, bar, task = [], None, None
        totals: dict[str, int] = {}
        for r in requests:
            totals[r.task_name] = totals.get(r.task_name, 0) + 1
        for r in requests:
            if r.task_name != task:
                if bar is not None:
                    bar.close()
                task = r.task_name
                bar = tqdm(total=totals[task], desc=f"{self.name} {task} ({kind})", disable=self.quiet, leave=False)
            out.append(answer(r.args))
            bar.update(1)
        if bar is not None:
            bar.close()
        return out

    def generate_until(self, requests: list[Instance]) -> list[str]:
        def answer(args: tuple) -> str:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = args[:6]
            return self.responder.generate(context, self._visuals(doc_to_visual, doc_id, task, split), gen_kwargs)

        return self._each(requests, "generate", answer)

    def loglikelihood(self, requests: list[Instance]) -> list:
        """(loss, is_greedy) per request: the continuation's negative log-likelihood, lmms-eval's convention (its
        ``multiple_choice`` picks the argmin). The choices of one question share their prefix's forward pass."""

        def answer(args: tuple) -> Any:
            if len(args) == 2:  # an unconditional request (acc_mutual_info): no document, no media
                return _pair(*self.responder.loglikelihood(args[0], args[1]))
            context, target, doc_to_visual, doc_id, task, split = args[:6]
            continuation = target if isinstance(target, str) else str(target(self.task_dict[task][split][doc_id]))
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            return _pair(*self.responder.loglikelihood(context, continuation, visuals,
                                                       prefix_key=(task, split, doc_id, context)))

        return self._each(requests, "log-likelihood", answer)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("nvila_quant does not answer multi-round tasks (generate_until_multi_round)")
