"""Tokenizer set-up: media tokens, the sentinel, the Qwen2 chat template and inferred stop tokens.

Mirrors VILA's ``build_llm_and_tokenizer`` / ``tokenizer_utils``: ids are always looked up from the
tokenizer, never hard-coded.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from nvila_quant.errors import CheckpointError, PromptError
from nvila_quant.model.llm import quiet_transformers

__all__ = [
    "IGNORE_INDEX",
    "MEDIA_TOKENS",
    "QWEN2_CHAT_TEMPLATE",
    "SENTINEL_TOKEN",
    "infer_stop_tokens",
    "load_tokenizer",
    "setup_tokenizer",
    "tokenize_conversation",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SENTINEL_TOKEN = "<vila/sentinel>"
MEDIA_TOKENS = {"image": "<image>", "video": "<vila/video>"}

# Qwen2 style as NVILA ships it: default system prompt without a trailing period.
QWEN2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages if message['content'] is not none %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_DUMMY_CONVERSATION = [{"from": "human", "value": "question"}, {"from": "gpt", "value": "answer"}] * 10
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _normalize(messages: list[dict[str, Any]], overrides: dict[str, str] | None) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(messages):
        sender = m.get("from", m.get("role"))
        if sender not in _ROLES:
            raise PromptError(f"message {i} has sender {sender!r}; expected 'human'/'gpt' (or 'user'/'assistant')")
        content = m.get("value", m.get("content"))
        if not isinstance(content, str):
            raise PromptError(f"message {i} must have text content at tokenization time, got {type(content).__name__}")
        if overrides is not None and m.get("from") in overrides:
            content = overrides[m["from"]]
        out.append({"role": _ROLES[sender], "content": content.strip()})
    return out


def tokenize_conversation(
    messages: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    add_generation_prompt: bool = False,
    overrides: dict[str, str] | None = None,
    no_system_prompt: bool = False,
) -> torch.Tensor:
    """Render VILA-style messages (``{"from": "human"|"gpt", "value": str}``) with the chat template
    and tokenize; media tokens in the text become their single ids. Returns (T,) int64."""
    conversation = _normalize(messages, overrides)
    if no_system_prompt:
        conversation = [{"role": "system", "content": ""}, *conversation]
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
    return torch.tensor(tokenizer(text).input_ids, dtype=torch.long)


def _add_special(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    tokenizer.add_tokens([token], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(token)


def infer_stop_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """EOS plus every token the template emits right after an assistant message (``<|im_end|>``)."""
    template = tokenize_conversation(copy.deepcopy(_DUMMY_CONVERSATION), tokenizer, overrides={"gpt": SENTINEL_TOKEN})
    stop_tokens = {tokenizer.eos_token} if tokenizer.eos_token else set()
    for k in range(template.size(0) - 1):
        if template[k] == tokenizer.sentinel_token_id:
            stop_tokens.add(tokenizer.convert_ids_to_tokens(int(template[k + 1])))
    return sorted(stop_tokens)


def setup_tokenizer(
    tokenizer: PreTrainedTokenizerBase, model_max_length: int | None = None, chat_template: str | None = None
) -> PreTrainedTokenizerBase:
    """Add the sentinel and media tokens, set the chat template, infer stop tokens (in place)."""
    if chat_template:
        if "{%" in chat_template or "{{" in chat_template:
            tokenizer.chat_template = chat_template
        elif chat_template in ("qwen2", "qwen2_5", "qwen"):
            tokenizer.chat_template = QWEN2_CHAT_TEMPLATE
        else:
            raise CheckpointError(
                f"config field 'chat_template' names template {chat_template!r}, which is not bundled; "
                "set it to null to use llm/tokenizer_config.json's template"
            )
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("tokenizer has no chat template; using NVILA's Qwen2 template")
        tokenizer.chat_template = QWEN2_CHAT_TEMPLATE
    if model_max_length:
        tokenizer.model_max_length = int(model_max_length)
    tokenizer.sentinel_token = SENTINEL_TOKEN
    tokenizer.sentinel_token_id = _add_special(tokenizer, SENTINEL_TOKEN)
    tokenizer.stop_tokens = infer_stop_tokens(tokenizer)
    tokenizer.stop_token_ids = tokenizer.convert_tokens_to_ids(tokenizer.stop_tokens)
    tokenizer.media_tokens = dict(MEDIA_TOKENS)
    tokenizer.media_token_ids = {name: _add_special(tokenizer, tok) for name, tok in MEDIA_TOKENS.items()}
    return tokenizer


def load_tokenizer(
    llm_dir: str | os.PathLike, model_max_length: int | None = None, chat_template: str | None = None
) -> PreTrainedTokenizerBase:
    """Load the tokenizer in ``llm/`` (or an -hf checkpoint's root) and set it up for NVILA (padding side: config)."""
    llm_dir = Path(llm_dir)
    if not any((llm_dir / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise CheckpointError(f"no tokenizer files in {llm_dir} (expected tokenizer.json or vocab.json + merges.txt)")
    try:
        with quiet_transformers():  # an -hf root's config.json names remote code: the tokenizer never needs it
            tokenizer = AutoTokenizer.from_pretrained(str(llm_dir), padding_side="right", use_fast=True,
                                                      trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer in {llm_dir}: {e}") from e
    return setup_tokenizer(tokenizer, model_max_length, chat_template)
