"""Our packed checkpoints read by the ecosystem's own code: the compressed-tensors library (the per-module
decompressor vLLM / SGLang / llm-compressor share) and transformers' compressed-tensors integration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nvila_quant.formats import QTensor
from nvila_quant.formats import compressed_tensors as ct
from nvila_quant.kernels.linear import QuantLinear
from nvila_quant.model.quantized import load_quantized_llm
from nvila_quant.quant.rtn import write_rtn_checkpoint


@pytest.mark.parametrize("bits", [2, 3, 4, 8])  # 3 bits: values cross int32 word boundaries
@pytest.mark.parametrize("symmetric", [False, True])
def test_compressed_tensors_decompresses_our_packing(bits: int, symmetric: bool) -> None:
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    qt = QTensor.from_float(torch.randn(40, 320), bits, 64, not symmetric, scale_dtype=torch.bfloat16)
    group = ct.quantization_config(bits, 64, symmetric, [])["config_groups"]["group_0"]
    scheme = QuantizationScheme.model_validate({k: v for k, v in group.items() if k != "format"})
    out = PackedQuantizationCompressor.decompress(ct.pack(qt), scheme)
    assert torch.equal(out["weight"], qt.dequantize(torch.bfloat16))


def test_transformers_loads_our_compressed_tensors_llm(tiny_nvila: Path, tmp_path: Path) -> None:
    """``llm/`` of a compressed-tensors output loads in transformers as a standard checkpoint, same weights."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    out = write_rtn_checkpoint(tiny_nvila, tmp_path / "ct", "compressed-tensors", group_size=32, targets=("llm",))
    try:
        config = CompressedTensorsConfig(dequantize=True)
    except TypeError:  # older transformers: the same switch under its former name
        config = CompressedTensorsConfig(run_compressed=False)
    theirs = AutoModelForCausalLM.from_pretrained(out / "llm", quantization_config=config, dtype=torch.bfloat16)
    ours = load_quantized_llm(out / "llm", torch.bfloat16, "cpu")
    weights = theirs.state_dict()
    packed = {name: m for name, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert len(packed) == 7 * ours.config.num_hidden_layers
    for name, module in packed.items():  # (q - z) * s in fp32, rounded once to the checkpoint dtype: both sides
        assert torch.equal(weights[f"{name}.weight"], module.dequantize_weight(torch.bfloat16)), name
    ids = torch.randint(0, ours.config.vocab_size, (1, 9))
    with torch.no_grad():
        for module in packed.values():
            module.backend = "reference"
        assert torch.equal(theirs(ids).logits, ours(ids).logits)
