"""Shared by the AWQ test files: one default AWQ run of the tiny NVILA, made once per session."""

from __future__ import annotations

from pathlib import Path

import torch

from nvila_quant.formats.checkpoint import read_quantized_submodel
from nvila_quant.quant.config import AWQConfig
from nvila_quant.quant.runner import QuantizeResult, quantize

# small and fast: 2 image + 2 text conversations, 512 tokens each
TEST_CONFIG = dict(numerics="reference", n_samples=4, text_ratio=0.5, seqlen=512, seed=42)
_RUNS: dict[str, QuantizeResult] = {}


def default_awq(tmp_path_factory, tiny_nvila) -> QuantizeResult:
    """The default (reference numerics) AWQ of the tiny NVILA with the built-in calibration set."""
    if "default" not in _RUNS:
        out = tmp_path_factory.mktemp("awq") / "tiny-awq"
        _RUNS["default"] = quantize(tiny_nvila, AWQConfig(**TEST_CONFIG), "builtin", out, progress=False)
    return _RUNS["default"]


def default_rtn(tmp_path_factory, tiny_nvila) -> QuantizeResult:
    if "rtn" not in _RUNS:
        out = tmp_path_factory.mktemp("rtn") / "tiny-rtn"
        _RUNS["rtn"] = quantize(tiny_nvila, AWQConfig(method="rtn"), None, out, progress=False)
    return _RUNS["rtn"]


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every quantized and float tensor of llm/ and mm_projector/ and every AWQ result are bit-identical."""
    for sub in ("llm", "mm_projector"):
        fa, qa, sa = read_quantized_submodel(a / sub)
        fb, qb, sb = read_quantized_submodel(b / sub)
        assert sa == sb and fa.keys() == fb.keys() and qa.keys() == qb.keys()
        assert all(torch.equal(fa[k], fb[k]) for k in fa), sub
        assert all(qa[k].equal(qb[k]) for k in qa), sub
    from nvila_quant.quant.results import read_awq_results

    ma, ta = read_awq_results(a / "awq_results.safetensors")
    mb, tb = read_awq_results(b / "awq_results.safetensors")
    assert ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
