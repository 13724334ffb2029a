"""The end-to-end demo behind ``nvila-quant demo`` (the README's main command)."""

from __future__ import annotations

import json
import os
import shutil

import torch
from transformers import GenerationConfig

from nvila_quant.io import check_output_dir
from nvila_quant.model import Image, NVILAQwen2
from nvila_quant.model.factory import TinySpec, make_tiny
from nvila_quant.model.summary import describe_checkpoint, format_description
from nvila_quant.paths import builtin_calib_dir

__all__ = ["run_demo"]


def _step(title: str) -> None:
    print(f"\n=== {title}")


def run_demo(workdir: str | os.PathLike, overwrite: bool = False, device: str = "cpu") -> dict:
    workdir = check_output_dir(workdir, overwrite)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    results: dict = {}

    _step("1. make a tiny synthetic NVILA with planted outlier channels")
    float_dir = make_tiny(workdir / "nvila-tiny", TinySpec(variant="nvila", seed=0, outliers=True))
    print(format_description(describe_checkpoint(float_dir)))

    _step("2. load it and answer a question about a built-in photo (streamed, KV-cached)")
    model = NVILAQwen2.load_pretrained(float_dir, torch_dtype=torch.float32, device=device)
    image = Image(builtin_calib_dir() / "astronaut.jpg")
    config = GenerationConfig(do_sample=False, max_new_tokens=16)
    print("answer: ", end="", flush=True)
    answer = ""
    for piece in model.stream_content([image, "Describe the image."], config):
        answer += piece
        print(piece, end="", flush=True)
    print()
    results["answer"] = answer.strip()

    _step("3. time the runtime (vision encode, time to first token, decode)")
    results["benchmark"] = model.benchmark([image, "Describe the image."], max_new_tokens=16)

    (workdir / "demo.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\ndemo outputs are in {workdir.absolute()} (demo.json). The model is synthetic: its answers "
          "are noise; the numbers show the pipeline works, not how a real NVILA performs.")
    return results
