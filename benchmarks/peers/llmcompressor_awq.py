"""llm-compressor's AWQ on an NVILA checkpoint's ``llm/`` (run by its own venv from ``benchmarks/awq.py``).

    python llmcompressor_awq.py --llm DIR --calib IDS.json --output DIR --threads T --result JSON
                                [--eval IDS.json --eval-logits FILE.safetensors]

As its README and examples use it: the LLM loaded with transformers in its stored dtype, ``oneshot`` with the
recipe ``AWQModifier(duo_scaling=True)`` + ``QuantizationModifier(scheme="W4A16_ASYM", targets=["Linear"],
ignore=["lm_head"])`` (4-bit, group 128, zero points: the same quantizer as ours) on the given calibration token
ids (one row per sample, as our pipeline tokenized them), saved compressed (compressed-tensors pack-quantized).
The result JSON has the wall time of ``oneshot`` alone and of the save, and the versions. ``--eval``: the saved
checkpoint is loaded back with transformers (compressed-tensors decompresses it) and its fp32 logits on those token
ids are written, so the caller can check its own reader of the checkpoint against llm-compressor's.

On a machine without an accelerator llm-compressor 0.14's AWQ fails in ``IntermediatesCache.pin_memory`` (page-locking
host memory for faster copies to a GPU: "Cannot access accelerator device when none is available"); with no GPU there
is nothing to copy to, so the cache's pinning is skipped there (``--no-pin`` is implied without CUDA).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", type=Path, required=True, help="a transformers Qwen2 checkpoint folder")
    parser.add_argument("--calib", type=Path, required=True, help="JSON list of token-id lists (one per sample)")
    parser.add_argument("--output", type=Path, required=True, help="folder for the compressed checkpoint")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--eval", type=Path, default=None, help="JSON list of token-id lists to compute logits on")
    parser.add_argument("--eval-logits", type=Path, default=None, help="safetensors file for those logits")
    args = parser.parse_args()

    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    pinned = torch.cuda.is_available()
    if not pinned:  # page-locked host memory only speeds up copies to a GPU (see the module docstring)
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **kw: None
    ids = json.loads(args.calib.read_text())
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.llm, dtype="auto")
    load_s = time.perf_counter() - t0
    recipe = [AWQModifier(duo_scaling=True),
              QuantizationModifier(ignore=["lm_head"], scheme="W4A16_ASYM", targets=["Linear"])]
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=max(len(x) for x in ids),
            num_calibration_samples=len(ids))
    oneshot_s = time.perf_counter() - t0
    dtype = model.dtype
    t0 = time.perf_counter()
    model.save_pretrained(args.output, save_compressed=True)
    save_s = time.perf_counter() - t0
    if args.eval is not None:
        from safetensors.torch import save_file

        del model
        back = AutoModelForCausalLM.from_pretrained(args.output, dtype=torch.float32)
        with torch.no_grad():
            logits = {str(i): back(input_ids=torch.tensor([x])).logits[0].float().contiguous()
                      for i, x in enumerate(json.loads(args.eval.read_text()))}
        save_file(logits, str(args.eval_logits))
    args.result.write_text(json.dumps({
        "load_s": load_s, "oneshot_s": oneshot_s, "save_s": save_s, "dtype": str(dtype),
        "samples": len(ids), "tokens": sum(len(x) for x in ids), "threads": torch.get_num_threads(),
        "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__},
        "recipe": "AWQModifier(duo_scaling=True) + QuantizationModifier(W4A16_ASYM, Linear, ignore lm_head)",
        "pin_memory": pinned,
    }, indent=1))


if __name__ == "__main__":
    main()
