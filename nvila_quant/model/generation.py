"""Generation over an NVILA model's decode session: sampling, multi-turn chat sessions and timing.

The KV cache lives in the model's :class:`~nvila_quant.model.session.DecodeSession` (``model.decode_session``), kept
between ``stream_gen`` calls, so a later chat turn only prefills its own tokens (and encodes only its own media).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from nvila_quant.errors import PromptError
from nvila_quant.model.session import DecodeSession
from nvila_quant.model.tokenizer import tokenize_conversation


class ChatModel(Protocol):
    """What generation needs of a model (``LlavaMetaForCausalLM`` provides it)."""

    tokenizer: Any
    decode_session: DecodeSession

    @property
    def device(self) -> torch.device: ...

    @property
    def default_generation_config(self) -> GenerationConfig: ...

    def prepare_media(self, conversation: list[dict[str, Any]]) -> tuple[dict, dict]: ...

    def embed_inputs(self, input_ids: torch.Tensor, media: dict | None, media_config: dict | None,
                     labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                     padding_side: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def stream_gen(self, input_ids: torch.Tensor, media: dict | None = None, media_cfg: dict | None = None,
                   start_pos: int = 0, chunk_prefilling: bool = False, attention_mask: torch.Tensor | None = None,
                   logits_to_keep: int = 0) -> tuple[torch.Tensor, int]: ...


__all__ = ["ChatModel", "ChatSession", "format_benchmark", "sample_next_token", "timed_run"]


# ---------------------------------------------------------------------------- sampling
def _processors(config: GenerationConfig) -> LogitsProcessorList:
    procs = LogitsProcessorList()
    if config.repetition_penalty and config.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.do_sample:
        if config.temperature and config.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            procs.append(TopKLogitsWarper(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            procs.append(TopPLogitsWarper(config.top_p))
    return procs


def sample_next_token(
    logits: torch.Tensor, config: GenerationConfig, history: torch.Tensor, processors: LogitsProcessorList | None = None
) -> torch.Tensor:
    """logits: (B, V) of the last position, history: (B, T) ids so far -> next ids (B,)."""
    processors = processors if processors is not None else _processors(config)
    scores = processors(history, logits.float())
    if config.do_sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return scores.argmax(dim=-1)


def _max_new_tokens(config: GenerationConfig, prompt_len: int) -> int:
    if config.max_new_tokens is not None:
        return int(config.max_new_tokens)
    return max(0, int(config.max_length or 0) - prompt_len)


def _stop_ids(model: Any, config: GenerationConfig) -> set[int]:
    eos = config.eos_token_id if config.eos_token_id is not None else model.tokenizer.stop_token_ids
    return set(eos if isinstance(eos, list | tuple) else [eos])


# ---------------------------------------------------------------------------- chat sessions
class ChatSession:
    """A multi-turn chat over ``stream_gen`` that re-uses the KV cache of earlier turns.

    Each :meth:`stream` / :meth:`send` call prefills only the tokens (and media) not yet in the cache.
    """

    def __init__(self, model: ChatModel) -> None:
        self.model = model
        self.messages: list[dict[str, str]] = []  # text messages, media as tokens
        self.token_ids: list[int] = []  # ids fed to the cache so far (media as one token each)
        self.positions: list[int | None] = []  # cache length after each of token_ids (media expanded)
        model.decode_session.reset()

    @property
    def length(self) -> int:
        return int(self.positions[-1]) if self.positions else 0

    def _common_prefix(self, ids: list[int]) -> int:
        n = 0
        for a, b in zip(self.token_ids, ids, strict=False):
            if a != b:
                break
            n += 1
        return n

    def send(self, prompt: Any, generation_config: GenerationConfig | None = None) -> str:
        """Add a user turn (str or list of parts) and return the full reply."""
        return "".join(self.stream_turn(prompt, generation_config)).strip()

    def stream_turn(self, prompt: Any, generation_config: GenerationConfig | None = None) -> Iterator[str]:
        parts = list(prompt) if isinstance(prompt, list | tuple) else [prompt]
        turn = [{"from": "human", "value": parts}]
        media, media_config = self.model.prepare_media(turn)
        self.messages.append({"from": "human", "value": turn[0]["value"]})
        ids = tokenize_conversation(copy.deepcopy(self.messages), self.model.tokenizer, add_generation_prompt=True)
        reply: list[str] = []
        for piece in self.stream(ids.unsqueeze(0), media, media_config, generation_config):
            reply.append(piece)
            yield piece
        self.messages.append({"from": "gpt", "value": "".join(reply)})

    def stream(
        self,
        input_ids: torch.Tensor,
        media: dict | None,
        media_config: dict | None,
        generation_config: GenerationConfig | None = None,
    ) -> Iterator[str]:
        """Feed ``input_ids`` (the whole conversation so far; the cached prefix is skipped) and yield text."""
        model = self.model
        config = generation_config or model.default_generation_config
        ids = input_ids[0].tolist()
        keep = self._common_prefix(ids)
        media_ids = set(model.tokenizer.media_token_ids.values())
        if keep < len(self.token_ids) and any(t in media_ids for t in self.token_ids[keep:]):
            raise PromptError("a cached chat turn with media changed; start a new ChatSession")
        if keep == len(ids):  # nothing new: re-feed the last token so there are logits to sample from
            keep -= 1
        while keep > 0 and self.positions[keep - 1] is None:  # no exact cache position: back off
            keep -= 1
        del self.token_ids[keep:], self.positions[keep:]
        new_ids = ids[keep:]
        start = self.length
        chunk = torch.tensor([new_ids], dtype=torch.long, device=model.device)
        logits, n = model.stream_gen(chunk, media, media_config, start, chunk_prefilling=start > 0, logits_to_keep=1)
        # cache length after each new id; exact before the first and after the last media token
        # (media tokens expand to their embedding blocks), None in between
        media_at = [i for i, t in enumerate(new_ids) if t in media_ids]
        for i, t in enumerate(new_ids):
            if not media_at or i < media_at[0]:
                pos: int | None = start + i + 1
            elif i >= media_at[-1]:
                pos = start + n - (len(new_ids) - 1 - i)
            else:
                pos = None
            self.token_ids.append(t)
            self.positions.append(pos)
        yield from self._decode(logits, config, prompt_len=self.length)

    def _decode(self, logits: torch.Tensor, config: GenerationConfig, prompt_len: int) -> Iterator[str]:
        model = self.model
        tokenizer = model.tokenizer
        stop = _stop_ids(model, config)
        processors = _processors(config)
        generated: list[int] = []
        text_sent = ""
        history = torch.tensor([self.token_ids], device=logits.device)
        max_new = _max_new_tokens(config, prompt_len)
        logits = logits[:, -1]
        # one step follows every sampled token (the last one's is unused): a static decoder for two or more
        with model.decode_session.decoding(max_new if max_new > 1 else 0) as step:
            for _ in range(max_new):
                next_id = int(sample_next_token(logits, config, history, processors)[0])
                if next_id in stop:
                    break
                generated.append(next_id)
                text = tokenizer.decode(generated, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # incomplete UTF-8 sequence: wait for the next token
                    delta = ""
                else:
                    delta, text_sent = text[len(text_sent) :], text
                start = self.length
                logits = step(torch.tensor([[next_id]], device=model.device))
                self.token_ids.append(next_id)
                self.positions.append(start + 1)
                history = torch.cat([history, history.new_tensor([[next_id]])], dim=1)
                if delta:
                    yield delta
        tail = tokenizer.decode(generated, skip_special_tokens=True)[len(text_sent) :]
        if tail:
            yield tail


# ---------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def timed_run(
    model: ChatModel,
    input_ids: torch.Tensor,
    media: dict | None,
    media_config: dict | None,
    max_new_tokens: int = 32,
) -> dict[str, float]:
    """Greedy-decode exactly ``max_new_tokens`` tokens (stop tokens ignored) on the model's decode session and time
    each phase: vision encode (media into embeddings), prefill, decode."""
    device = model.device
    session = model.decode_session
    _sync(device)
    t0 = time.perf_counter()
    embeds, _, mask = model.embed_inputs(input_ids, media, media_config)
    _sync(device)
    t1 = time.perf_counter()
    logits = session.extend(embeds, mask, 0, logits_to_keep=1)
    next_id = logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    t2 = time.perf_counter()
    n_decode = max(0, max_new_tokens - 1)
    with session.decoding(n_decode) as step:  # a decode step per CUDA graph replay on GPUs
        for _ in range(n_decode):
            next_id = step(next_id).argmax(-1, keepdim=True)
    _sync(device)
    t3 = time.perf_counter()
    return {
        "vision_encode_ms": (t1 - t0) * 1e3,
        "prefill_ms": (t2 - t1) * 1e3,
        "ttft_ms": (t2 - t0) * 1e3,
        "prefill_tokens": int(embeds.shape[1]),
        "prefill_tokens_per_s": embeds.shape[1] / max(t2 - t1, 1e-9),
        "decode_tokens": n_decode,
        "decode_tokens_per_s": n_decode / max(t3 - t2, 1e-9) if n_decode else 0.0,
    }


def format_benchmark(result: dict[str, float]) -> str:
    rows = [
        ("vision encode", f"{result['vision_encode_ms']:.1f} ms"),
        ("prefill", f"{result['prefill_ms']:.1f} ms ({result['prefill_tokens']} tokens, "
                    f"{result['prefill_tokens_per_s']:.0f} tok/s)"),
        ("time to first token", f"{result['ttft_ms']:.1f} ms"),
        ("decode", f"{result['decode_tokens_per_s']:.1f} tok/s ({result['decode_tokens']} tokens)"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
