"""The acceptance path on tiny NVILA and NVILA-Lite: an -hf checkpoint in -> awq -> every export -> each engine's
loader rules -> our runtime on each export gives the three-folder path's answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from greedy_oracle import assert_greedy_answer
from PIL import Image
from serving.sglang_rules import check_sglang_checkpoint
from serving.trtllm_rules import check_trtllm_checkpoint, dequantized_llm_weights
from serving.vllm_rules import check_vllm_llm_folder
from transformers import GenerationConfig

from nvila_quant.cli import main
from nvila_quant.formats.checkpoint import read_quantized_submodel
from nvila_quant.model import NVILAQwen2
from nvila_quant.model.config import load_config

PROMPT_TEXT = "Describe the image."


@pytest.mark.parametrize("variant", ["nvila", "nvila_lite"])
def test_hf_in_awq_every_export_same_answers(variant, tiny_nvila_hf, tiny_nvila_lite_hf, tmp_path, capsys):
    source = tiny_nvila_hf if variant == "nvila" else tiny_nvila_lite_hf
    quantized, folders, trt = tmp_path / "awq-hf", tmp_path / "awq-vila", tmp_path / "awq-trtllm"
    assert main(["awq", "--model", str(source), "--output", str(quantized), "--no-zero-point", "--n-samples", "2",
                 "--seqlen", "96", "--dtype", "fp32", "--quiet"]) == 0
    assert main(["convert", "--model", str(quantized), "--to", "vila", "--output", str(folders), "--quiet"]) == 0
    assert main(["convert", "--model", str(quantized), "--to", "trtllm", "--output", str(trt), "--quiet"]) == 0
    capsys.readouterr()
    assert load_config(quantized).layout == "hf"

    # each engine's loader rules (the tiny widths are not the stock ones SGLang hard-codes)
    assert check_sglang_checkpoint(quantized, stock_geometry=False) == []
    assert check_vllm_llm_folder(folders / "llm") == []
    assert check_trtllm_checkpoint(trt) == []

    # one set of int4 codes behind all three
    _, codes, _ = read_quantized_submodel(load_config(quantized).part("llm"))
    _, codes_vila, _ = read_quantized_submodel(folders / "llm")
    assert codes.keys() == codes_vila.keys() and all(codes[k].equal(codes_vila[k]) for k in codes)
    trt_weights = dequantized_llm_weights(trt)
    for name, qt in codes.items():
        assert torch.equal(trt_weights[name].to(qt.scale.dtype), qt.dequantize()), name

    # our runtime: the flat export answers as the three folders do
    image = Image.fromarray((np.random.default_rng(5).random((360, 640, 3)) * 255).astype("uint8"))
    flat = NVILAQwen2.load_pretrained(quantized, torch_dtype=torch.float32, device="cpu")
    three = NVILAQwen2.load_pretrained(folders, torch_dtype=torch.float32, device="cpu")
    ids = three.tokenizer("a photo of a dog", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(flat.llm(input_ids=ids).logits, three.llm(input_ids=ids).logits)  # same int4 LLM
    config = GenerationConfig(max_new_tokens=12, do_sample=False)
    text = flat.generate_content([image, PROMPT_TEXT], config)
    # the flat export's projector is the dequantized one with its AWQ activation scales folded into the next
    # linear (fp32 rounding apart): answers may part only where the reference's two best logits are within 1e-3
    assert_greedy_answer(three, [image, PROMPT_TEXT], text, max_new_tokens=12, tolerance=1e-3)
