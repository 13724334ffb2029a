"""A real client of ``OUT/llm``: transformers 5 + gptqmodel load the AutoAWQ checkpoint on CPU and run it.

Run in its own process (``python gptqmodel_client.py LLM_DIR RESULT.safetensors PROMPT...``): importing gptqmodel
patches process-wide state (``safetensors.torch.save_file``, transformers quantizer tables, environment variables),
which must not leak into the test session. Writes, for the comparison in ``test_vllm_awq.py``:
    weight.<module>: (N, K) fp32   gptqmodel's own AWQ dequantization of each converted linear, from the buffers
                                   it loaded (scales taken to fp32, so the value is exact), before any repack
    ids.<i>:         (1, T) int64  the tokenizer's ids of prompt i
    logits.<i>:      (1, T, V) fp32 the model's logits (loaded in fp32; gptqmodel picks its CPU kernel)
and in the metadata: the kernel class of each converted linear, the lm_head class, gptqmodel's version.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

__all__ = ["run_client"]


def run_client(llm_dir: Path, result: Path, prompts: list[str]) -> None:
    """Load ``llm_dir`` with transformers (AWQ via gptqmodel) in fp32 on CPU and save its weights and logits."""
    import gptqmodel
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32, device_map="cpu")
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    tensors, kernels = {}, {}
    for name, module in model.named_modules():
        if hasattr(module, "qweight") and hasattr(module, "qzeros"):
            weight = dequantize_gemm(module.qweight, module.qzeros, module.scales.float(), module.bits,
                                     module.group_size)  # (K, N)
            tensors[f"weight.{name}"] = weight.t().contiguous()
            kernels[name] = type(module).__name__
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            tensors[f"ids.{i}"] = ids
            tensors[f"logits.{i}"] = model(ids).logits.float()
    from safetensors.torch import save_file  # after the forwards: gptqmodel wraps it on import, harmless here

    metadata = {"kernels": json.dumps(kernels), "lm_head": type(model.get_submodule("lm_head")).__name__,
                "gptqmodel": gptqmodel.__version__}
    save_file(tensors, str(result), metadata=metadata)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("llm_dir", type=Path, help="the llm/ folder of a quantized NVILA (AutoAWQ GEMM)")
    parser.add_argument("result", type=Path, help="safetensors file to write")
    parser.add_argument("prompts", nargs="+", help="text prompts to run")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_client(args.llm_dir, args.result, args.prompts)


if __name__ == "__main__":
    main()
