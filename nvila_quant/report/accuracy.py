"""Accuracy of a candidate against the reference on held-out data, one model in memory at a time.

The reference's outputs that the metrics need (answer-position logits, visual tokens, greedy generations)
are computed once and kept; each candidate is then loaded, run on the same inputs and compared.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from transformers import GenerationConfig

from nvila_quant.model.llm import llm_forward, make_cache
from nvila_quant.model.media import Image
from nvila_quant.model.tokenizer import tokenize_conversation
from nvila_quant.numerics import metrics
from nvila_quant.report.evalset import EvalSet

__all__ = ["ModelOutputs", "compare_outputs", "run_model", "visual_tokens"]

PROMPT = "Describe the image."


@dataclass
class ModelOutputs:
    """What one model produced on an :class:`EvalSet` (everything on CPU, float32)."""

    answer_logits: list[torch.Tensor] = field(default_factory=list)  # per conversation (K, V)
    answer_targets: list[torch.Tensor] = field(default_factory=list)  # per conversation (K,)
    visual_tokens: list[torch.Tensor] = field(default_factory=list)  # per image (tokens, H)
    generations: list[list[int]] = field(default_factory=list)  # greedy ids per generation prompt
    generation_texts: list[str] = field(default_factory=list)
    text_nll: float = 0.0
    text_tokens: int = 0


def _conversation(sample_image, caption: str) -> list[dict]:
    return [{"from": "human", "value": [Image(sample_image), PROMPT]}, {"from": "gpt", "value": caption}]


@torch.inference_mode()
def _answer_logits(model, image, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits predicting each answer token (caption + <|im_end|>) and those targets: (K, V), (K,)."""
    conversation = _conversation(image, caption)
    media, media_config = model.prepare_media(conversation)
    prompt_ids = tokenize_conversation(copy.deepcopy(conversation[:1]), model.tokenizer, add_generation_prompt=True)
    full_ids = tokenize_conversation(copy.deepcopy(conversation), model.tokenizer)
    # targets: the answer tokens up to and including the stop token (not the template's trailing "\n")
    end = len(full_ids)
    stops = set(model.tokenizer.stop_token_ids)
    while end > len(prompt_ids) and int(full_ids[end - 1]) not in stops:
        end -= 1
    ids = full_ids[:end]
    k = end - len(prompt_ids)
    embeds, _, _ = model.embed_inputs(ids[None], media, media_config, None, None)
    logits = llm_forward(model.get_llm(), embeds, make_cache(model.get_llm()), logits_to_keep=k + 1)
    return logits[0, :-1].float().cpu(), ids[-k:].cpu()


@torch.inference_mode()
def visual_tokens(model, image) -> torch.Tensor:
    """The first image's LLM-space visual tokens (tokens, H), fp32 on CPU."""
    media, media_config = model.prepare_media([{"from": "human", "value": [Image(image)]}])
    tiles = torch.stack(media["image"])
    feats = model.encode_images(tiles, block_sizes=media_config.get("image", {}).get("block_sizes"))
    first = feats[0]
    return first.float().cpu()


@torch.inference_mode()
def _text_nll(model, text: str) -> tuple[float, int]:
    ids = torch.tensor([model.tokenizer(text, add_special_tokens=False).input_ids], device=model.device)
    if ids.shape[1] < 2:
        return 0.0, 0
    logits = model.get_llm()(input_ids=ids).logits[0, :-1]
    return float(metrics.nll(logits, ids[0, 1:]).sum()), ids.shape[1] - 1


@torch.inference_mode()
def run_model(model, evalset: EvalSet, n_generate: int = 3, max_new_tokens: int = 24, desc: str = "") -> ModelOutputs:
    """Run every measurement on one model."""
    out = ModelOutputs()
    for sample in tqdm(evalset.conversations, desc=f"{desc} conversations", leave=False):
        logits, targets = _answer_logits(model, sample.image, sample.caption)
        out.answer_logits.append(logits)
        out.answer_targets.append(targets)
        out.visual_tokens.append(visual_tokens(model, sample.image))
    for text in tqdm(evalset.texts, desc=f"{desc} text", leave=False):
        total, n = _text_nll(model, text)
        out.text_nll += total
        out.text_tokens += n
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens)
    config.eos_token_id = list(model.tokenizer.stop_token_ids)
    config.pad_token_id = model.tokenizer.pad_token_id
    for sample in evalset.conversations[:n_generate]:
        conversation = [{"from": "human", "value": [Image(sample.image), PROMPT]}]
        media, media_config = model.prepare_media(conversation)
        ids = tokenize_conversation(conversation, model.tokenizer, add_generation_prompt=True)[None]
        gen = model.generate(ids, media, media_config, generation_config=config)[0].tolist()
        out.generations.append(gen)
        out.generation_texts.append(model.tokenizer.decode(gen, skip_special_tokens=True).strip())
    return out


def compare_outputs(ref: ModelOutputs, cand: ModelOutputs) -> dict:
    """Candidate-vs-reference metrics (floats, not rounded)."""
    kl = torch.cat([metrics.kl_divergence(r, c) for r, c in zip(ref.answer_logits, cand.answer_logits, strict=True)])
    top1 = torch.cat([metrics.top1_agreement(r, c) for r, c in zip(ref.answer_logits, cand.answer_logits, strict=True)])
    ref_nll = torch.cat([metrics.nll(r, t) for r, t in zip(ref.answer_logits, ref.answer_targets, strict=True)])
    cand_nll = torch.cat([metrics.nll(c, t) for c, t in zip(cand.answer_logits, ref.answer_targets, strict=True)])
    vis_cos = [metrics.cosine(r, c) for r, c in zip(ref.visual_tokens, cand.visual_tokens, strict=True)]
    vis_abs = [metrics.max_abs(r, c) for r, c in zip(ref.visual_tokens, cand.visual_tokens, strict=True)]
    gens = []
    for i, (a, b) in enumerate(zip(ref.generations, cand.generations, strict=True)):
        gens.append({
            "prompt": i,
            "reference": ref.generation_texts[i],
            "candidate": cand.generation_texts[i],
            "first_divergence": metrics.first_divergence(a, b),
            "identical": a == b,
        })
    n = max(len(ref.answer_logits), 1)
    return {
        "answer_positions": int(kl.numel()),
        "conversations": n if ref.answer_logits else 0,
        "kl_mean": float(kl.mean()) if kl.numel() else 0.0,
        "kl_max": float(kl.max()) if kl.numel() else 0.0,
        "top1_agreement": float(top1.mean()) if top1.numel() else 1.0,
        "answer_ppl_reference": metrics.perplexity(float(ref_nll.sum()), ref_nll.numel()),
        "answer_ppl": metrics.perplexity(float(cand_nll.sum()), cand_nll.numel()),
        "text_ppl_reference": metrics.perplexity(ref.text_nll, ref.text_tokens) if ref.text_tokens else None,
        "text_ppl": metrics.perplexity(cand.text_nll, cand.text_tokens) if cand.text_tokens else None,
        "text_tokens": ref.text_tokens,
        "visual_cosine": min(vis_cos) if vis_cos else None,
        "visual_cosine_mean": sum(vis_cos) / len(vis_cos) if vis_cos else None,
        "visual_max_abs": max(vis_abs) if vis_abs else None,
        "generations": gens,
    }
