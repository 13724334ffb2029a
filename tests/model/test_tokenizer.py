"""Tokenizer set-up: media tokens, chat template, stop tokens, embedding growth."""

from __future__ import annotations

from nvila_quant.model.tokenizer import QWEN2_CHAT_TEMPLATE, tokenize_conversation


def test_media_tokens_added_after_stored_vocab(tiny_model, tiny_nvila):
    import json

    tok = tiny_model.tokenizer
    stored = json.loads((tiny_nvila / "llm" / "config.json").read_text())["vocab_size"]
    assert tok.sentinel_token_id == stored  # <vila/sentinel> first, then <image>, <vila/video>
    assert tok.media_token_ids == {"image": stored + 1, "video": stored + 2}
    assert tok.convert_ids_to_tokens(stored + 1) == "<image>"
    emb = tiny_model.get_llm().get_input_embeddings().weight
    assert emb.shape[0] == len(tok) == stored + 3
    assert tiny_model.get_lm_head().weight.shape[0] == len(tok)
    ids = tok("a<image>b<vila/video>", add_special_tokens=False).input_ids
    assert stored + 1 in ids and stored + 2 in ids


def test_chat_template_matches_reference(tiny_model):
    tok = tiny_model.tokenizer
    ids = tokenize_conversation([{"from": "human", "value": "<image>Describe"}], tok, add_generation_prompt=True)
    text = tok.decode(ids)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\n<image>Describe<|im_end|>\n<|im_start|>assistant\n"
    )
    two = tokenize_conversation(
        [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "q2"}], tok
    )
    assert tok.decode(two).count("<|im_start|>") == 4
    assert tok.chat_template == QWEN2_CHAT_TEMPLATE


def test_stop_tokens_inferred(tiny_model):
    tok = tiny_model.tokenizer
    assert tok.stop_tokens == ["<|im_end|>"]
    assert tok.stop_token_ids == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert tiny_model.default_generation_config.eos_token_id == tok.stop_token_ids
