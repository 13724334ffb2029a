"""Shared by the benchmark tests (tests/eval, tests/report/test_benchmark.py): small tiny checkpoints made once per
session, and the mark for tests that need lmms-eval."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from nvila_quant.quant.config import AWQConfig
from nvila_quant.quant.runner import quantize
from nvila_quant.testing.factory import TinySpec, make_tiny

LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None
needs_lmms_eval = pytest.mark.skipif(
    not LMMS_EVAL, reason="lmms-eval is not installed: `make test-eval` installs the eval extra and runs these")

# NVILA-Lite at 112 px: 10 tiles of 64 tokens, a few hundred LLM positions per prompt (the 448 px tiny model has
# thousands; these tests run many prompts)
SPEC = TinySpec(variant="nvila-lite", seed=1, image_size=112)
_MADE: dict[str, Path] = {}


def small_tiny(tmp_path_factory: pytest.TempPathFactory, layout: str = "vila") -> Path:
    """The small tiny NVILA-Lite, float, in ``layout`` (the same weights in either)."""
    if layout not in _MADE:
        _MADE[layout] = make_tiny(tmp_path_factory.mktemp("eval-ckpt") / f"lite-112-{layout}", SPEC, layout=layout)
    return _MADE[layout]


def small_tiny_rtn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Its int4 round-to-nearest quantization (AutoAWQ format)."""
    if "rtn" not in _MADE:
        out = tmp_path_factory.mktemp("eval-ckpt") / "lite-112-rtn"
        _MADE["rtn"] = quantize(small_tiny(tmp_path_factory), AWQConfig(method="rtn"), None, out, progress=False).output
    return _MADE["rtn"]
