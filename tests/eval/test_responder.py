"""The harness-free side of the benchmark adapter: NVILA's prompt placement, greedy answers equal to generate_content's
in either layout, log-likelihoods equal to a full forward pass, and the run settings' checks."""

from __future__ import annotations

import PIL.Image
import pytest
import torch
from eval_helpers import small_tiny
from transformers import GenerationConfig

from nvila_quant.errors import ConfigError, MediaError
from nvila_quant.eval import responder as responder_module
from nvila_quant.eval.responder import Responder, load_responder, prompt_parts
from nvila_quant.eval.runner import EvalConfig
from nvila_quant.model import Image, NVILAQwen2, Video
from nvila_quant.model.llm import llm_forward, make_cache
from nvila_quant.paths import builtin_eval_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return NVILAQwen2.load_pretrained(small_tiny(tmp_path_factory), torch_dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def photo():
    with PIL.Image.open(builtin_eval_dir() / "coins.jpg") as im:
        return im.convert("RGB")


def test_prompt_parts_put_media_first_or_at_markers(photo, tmp_path):
    other = PIL.Image.new("RGB", (32, 32))
    assert prompt_parts("What is it?", [photo]) == [photo, "What is it?"]
    assert prompt_parts("Compare <image> with <image>.", [photo, other]) == ["Compare ", photo, " with ", other, "."]
    # a visual without a marker goes first; a marker without a visual is dropped
    assert prompt_parts("A <image> B", [photo, other]) == [other, "A ", photo, " B"]
    assert prompt_parts("<image>\nQ", []) == ["\nQ"]
    clip = tmp_path / "clip.mp4"
    assert prompt_parts("Q", [str(clip), str(builtin_eval_dir() / "clock.jpg")]) == [
        Image(builtin_eval_dir() / "clock.jpg"), Video(clip), "Q"]
    with pytest.raises(MediaError, match="unsupported visual of type dict"):
        prompt_parts("Q", [{"array": [0.0], "sampling_rate": 16000}])


def test_answers_are_generate_contents_in_either_layout(model, tmp_path_factory, photo):
    greedy = GenerationConfig(max_new_tokens=6, do_sample=False)
    expected = model.generate_content([photo, "What is shown?"], greedy)
    r = Responder(model)
    assert r.generate("What is shown?", [photo], {"max_new_tokens": 6, "temperature": 0, "until": ["\n\n"]}) == expected
    cut = expected[2:4]
    assert r.generate("What is shown?", [photo], {"max_new_tokens": 6, "until": [cut]}) == expected.split(cut)[0]
    flat = load_responder(small_tiny(tmp_path_factory, layout="hf"), dtype="fp32", device="cpu")
    assert flat.generate("What is shown?", [photo], {"max_new_tokens": 6}) == expected
    config = r.generation_config({})
    assert config.max_new_tokens == r.max_new_tokens and not config.do_sample and config.num_beams == 1
    assert r.generation_config({"do_sample": True, "temperature": 0.7}).do_sample


@torch.inference_mode()
def _full_forward_nll(model, context, continuation, image) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The continuation's NLL from one forward pass over prompt + continuation (no cache reuse)."""
    ids, media, media_config = model.prompt_inputs([image, context])
    targets = torch.tensor(model.tokenizer(continuation, add_special_tokens=False).input_ids)
    embeds, _, _ = model.embed_inputs(torch.cat([ids, targets[None]], 1), media, media_config)
    logits = llm_forward(model.get_llm(), embeds, make_cache(model.get_llm()), logits_to_keep=len(targets) + 1)
    logits = logits[0, :-1].float()
    return -float(torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum()), logits, targets


def test_loglikelihood_is_the_continuations_nll(model, photo):
    r = Responder(model)
    key = ("task", "test", 0, "Describe the image.")
    for choice in [" Rows of old coins.", " A round clock.", " Rows of old coins."]:  # the prefix is run once
        nll, greedy = r.loglikelihood("Describe the image.", choice, [photo], prefix_key=key)
        expected, logits, targets = _full_forward_nll(model, "Describe the image.", choice, photo)
        assert nll == pytest.approx(expected, rel=1e-4)
        assert greedy == bool((logits.argmax(-1) == targets).all())
    # the model's own greedy answer is greedy; mean = sum / tokens
    greedy3 = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=model.tokenizer.stop_token_ids)
    answer = model.tokenizer.decode(model.generate(*model.prompt_inputs([photo, "Q"]), generation_config=greedy3)[0])
    total, greedy = r.loglikelihood("Q", answer, [photo])
    assert greedy and total > 0
    n = len(model.tokenizer(answer, add_special_tokens=False).input_ids)
    mean, _ = Responder(model, ll_reduction="mean").loglikelihood("Q", answer, [photo])
    assert mean == pytest.approx(total / n, rel=1e-5)
    assert r.loglikelihood("Q", "", [photo]) == (0.0, True)
    # an unconditional request (no context, no media) works too
    assert r.loglikelihood("", " coins")[0] > 0


def test_load_responder_passes_the_backend(monkeypatch):
    seen = {}

    def fake(path, **kwargs):
        seen.update(kwargs, path=path)
        return object()

    monkeypatch.setattr(responder_module.NVILAQwen2, "load_pretrained", fake)
    load_responder("ckpt", dtype="bf16", device="cpu", onnx_dir="exported")
    assert seen == {"path": "ckpt", "torch_dtype": "bf16", "device": "cpu", "vision_backend": "onnx",
                    "onnx_dir": "exported"}


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="ll_reduction"):
        Responder(model=None, ll_reduction="max")
    with pytest.raises(ConfigError, match="at least one task"):
        EvalConfig(" , ")
    with pytest.raises(ConfigError, match="limit must be >= 1"):
        EvalConfig("nvq_mc", limit=0)
    cfg = EvalConfig("nvq_mc, nvq_vqa", device="cpu")
    assert cfg.tasks == ["nvq_mc", "nvq_vqa"] and cfg.dtype == "bf16"
