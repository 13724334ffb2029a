"""A real client of the flat -hf export's LLM on CPU: transformers' compressed-tensors integration reads the
``llm.*`` tensors of the flat shards (``key_mapping`` strips the prefix, as SGLang's ``load_weights`` does) with the
export's top-level ``quantization_config``, and computes our runtime's logits exactly."""

from __future__ import annotations

import json

import torch
from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig

from nvila_quant.export.convert import convert
from nvila_quant.kernels.linear import QuantLinear
from nvila_quant.model.config import load_config
from nvila_quant.model.quantized import load_quantized_llm
from nvila_quant.quant.rtn import write_rtn_checkpoint


def test_transformers_loads_the_flat_exports_llm(tiny_nvila, tmp_path):
    out = write_rtn_checkpoint(tiny_nvila, tmp_path / "ct", "compressed-tensors", group_size=32, targets=("llm",))
    flat = tmp_path / "flat"
    convert(out, flat, "hf", progress=False)
    cfg = json.loads((flat / "config.json").read_text())
    text = {**cfg["text_config"], "quantization_config": cfg["quantization_config"]}
    config = AutoConfig.for_model(text.pop("model_type"), **text)
    theirs = AutoModelForCausalLM.from_pretrained(str(flat), config=config, key_mapping={r"^llm\.": ""},
                                                  quantization_config=CompressedTensorsConfig(dequantize=True),
                                                  dtype=torch.bfloat16)
    ours = load_quantized_llm(load_config(flat).part("llm"), torch.bfloat16, "cpu")
    packed = [m for m in ours.modules() if isinstance(m, QuantLinear)]
    assert len(packed) == 7 * ours.config.num_hidden_layers
    for module in packed:
        module.backend = "reference"  # (q - z) * s rounded once to bf16, as the decompressor does
    ids = torch.randint(0, ours.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ours(ids).logits)
