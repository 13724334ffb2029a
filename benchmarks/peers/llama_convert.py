"""Run llama.cpp's ``convert_hf_to_gguf.py`` with the BPE pre-tokenizer fixed to Qwen2's (run by the convert venv).

    python llama_convert.py --llama-cpp SRC_DIR [--pre qwen2] -- HF_DIR --outtype bf16 --outfile OUT.gguf

The converter identifies a BPE tokenizer's pre-tokenizer by hashing how it encodes a test string and refuses hashes
it does not know. The synthetic checkpoints' tokenizer is trained locally with Qwen2's split pattern, so its hash is
new: this wrapper imports the converter's ``conversion`` package from the vendored source, replaces
``TextModel.get_vocab_base_pre`` (the hash lookup) by one that answers ``--pre``, and runs the unmodified
``convert_hf_to_gguf.py`` as ``__main__`` (the vendored files stay untouched on disk).
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source folder (convert_hf_to_gguf.py)")
    parser.add_argument("--pre", default="qwen2", help="pre-tokenizer name written as tokenizer.ggml.pre")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of convert_hf_to_gguf.py (after --)")
    args = parser.parse_args()
    src = args.llama_cpp.resolve()
    script = src / "convert_hf_to_gguf.py"
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    from conversion.base import TextModel  # the vendored converter's package

    pre = args.pre

    def get_vocab_base_pre(self, tokenizer) -> str:  # noqa: ANN001, ARG001 (the converter's signature)
        return pre

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
