"""An oracle for greedy generation independent of the runtime's decoding: a step-by-step argmax of transformers' own
causal LM that recomputes every position from the prompt's input embeddings at each step (no KV cache, no decode
session, no ``generate``)."""

from __future__ import annotations

import torch


@torch.inference_mode()
def greedy_reference(model, prompt, max_new_tokens: int, inputs: tuple | None = None  # noqa: ANN001
                     ) -> tuple[list[int], list[float]]:
    """Token ids of the greedy answer to ``prompt`` (or to ``inputs`` = (input_ids, media, media_config) of a whole
    conversation; stop tokens excluded) and, per step, the gap between the best and the second-best logit."""
    input_ids, media, media_config = inputs if inputs is not None else model.prompt_inputs(prompt)
    embeds, _, _ = model.embed_inputs(input_ids, media, media_config)  # (1, T, H)
    llm = model.get_llm()
    embed = llm.get_input_embeddings()
    stop = set(model.tokenizer.stop_token_ids)
    ids: list[int] = []
    gaps: list[float] = []
    for _ in range(max_new_tokens):
        logits = llm(inputs_embeds=embeds, use_cache=False).logits[0, -1].float()
        top = logits.topk(2)
        token = int(top.indices[0])
        gaps.append(float(top.values[0] - top.values[1]))
        if token in stop:
            break
        ids.append(token)
        embeds = torch.cat([embeds, embed(torch.tensor([[token]], device=embeds.device))], dim=1)
    return ids, gaps


def assert_greedy_answer(model, prompt, text: str, max_new_tokens: int, tolerance: float = 0.0,  # noqa: ANN001
                         inputs: tuple | None = None) -> None:
    """``text`` (a runtime's greedy answer) is the reference's. With ``tolerance`` > 0 (half precision, where the two
    computations round differently) they may part only at a step whose two best reference logits are within it."""
    ids, gaps = greedy_reference(model, prompt, max_new_tokens, inputs)
    decode = model.tokenizer.decode
    want = decode(ids, skip_special_tokens=True).strip()
    if text == want:
        return
    for k in range(len(gaps)):
        prefix = decode(ids[: k + 1], skip_special_tokens=True).strip()
        if k < len(ids) and (prefix.endswith("\ufffd") or text.startswith(prefix)):
            continue  # (an incomplete UTF-8 sequence decodes to U+FFFD until its last byte arrives)
        assert gaps[k] <= tolerance, (f"runtime answer {text!r} differs from the reference {want!r} at step {k}, "
                                      f"where the reference's best logit leads by {gaps[k]:.3g} > {tolerance:.3g}")
        return
    raise AssertionError(f"runtime answer {text!r} differs from the reference {want!r}")
