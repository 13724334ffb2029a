"""``--quantize-lm-head``: the output head quantized after the last block (RTN and AWQ), written, loaded and run.

Oracles: the float checkpoint loaded by the standard loader with every quantized linear (the head included, at its
padded rows) set to its dequantized weight, run by an independent greedy decoder (tests/greedy_oracle.py); round to
nearest of the grown float head for the packed codes; ``awq_results`` re-applied to the float head.
"""

from __future__ import annotations

import functools

import pytest
import torch
from awq_helpers import TEST_CONFIG
from greedy_oracle import assert_greedy_answer
from serving.sglang_rules import check_sglang_checkpoint
from torch import nn
from transformers import GenerationConfig

from nvila_quant.cli import build_parser, main
from nvila_quant.errors import CheckpointError, ConfigError
from nvila_quant.export.trtllm import check_trtllm
from nvila_quant.formats.checkpoint import read_quantized_submodel
from nvila_quant.io import read_json, read_tensors
from nvila_quant.kernels import QuantLinear
from nvila_quant.model import NVILAQwen2
from nvila_quant.model.config import load_config
from nvila_quant.model.llm import mean_row
from nvila_quant.model.quantized import quantized_modules
from nvila_quant.numerics import metrics
from nvila_quant.numerics.qtensor import QTensor
from nvila_quant.quant import head as head_module
from nvila_quant.quant.awq import apply_clip, apply_scales
from nvila_quant.quant.config import AWQConfig
from nvila_quant.quant.head import HEAD_GROUP, head_rows, sample_tokens, streaming_errors
from nvila_quant.quant.lazy import HeadModule, LLMBlocks
from nvila_quant.quant.results import apply_awq_results, load_block_result, read_awq_results
from nvila_quant.quant.runner import quantize, work_dir_for
from nvila_quant.testing.factory import TinySpec, make_tiny

GREEDY = GenerationConfig(max_new_tokens=10, do_sample=False)
TOKENS = 726  # the tiny models' runtime vocabulary: 723 stored + sentinel + 2 media tokens (Lite: 724 + 3 = 727)
ROWS = 768  # padded to a multiple of 64
# the AWQ run of these tests: the LLM only, few tokens, the head's search on a 512-token subset of them
HEAD_AWQ = dict(TEST_CONFIG, n_samples=2, seqlen=384, targets="llm", format="compressed-tensors",
                quantize_lm_head=True, lm_head_tokens=512)


@pytest.fixture(scope="module")
def rtn_head(tiny_nvila, tmp_path_factory):
    out = tmp_path_factory.mktemp("rtn-head") / "q"
    assert main(["rtn", "--model", str(tiny_nvila), "--output", str(out), "--quantize-lm-head", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def awq_head(tiny_nvila, tmp_path_factory):
    out = tmp_path_factory.mktemp("awq-head") / "q"
    return quantize(tiny_nvila, AWQConfig(**HEAD_AWQ), "builtin", out, progress=False)


def _dequantized_float(float_path, quantized: NVILAQwen2, dtype: torch.dtype = torch.float32) -> NVILAQwen2:
    """The float checkpoint (standard loader) with each quantized linear set to its dequantized weight; the head
    (tied or not) replaced by its own Linear of the quantized head's rows, the embeddings grown to them with the
    runtime's mean row (rows no token id reaches)."""
    model = NVILAQwen2.load_pretrained(float_path, torch_dtype=dtype, device="cpu")
    llm = model.llm
    with torch.no_grad():
        for name, q in quantized_modules(quantized).items():
            if name == "llm.lm_head":
                head = nn.Linear(q.in_features, q.out_features, bias=False, dtype=dtype)
                head.weight.copy_(q.dequantize_weight(dtype))
                llm.lm_head = head
                emb = llm.get_input_embeddings().weight
                stored = int(read_json(float_path / "llm" / "config.json")["vocab_size"])
                grown = torch.cat([emb, mean_row(emb[:stored], torch.bfloat16).expand(q.out_features - emb.shape[0],
                                                                                      -1)])
                llm.model.embed_tokens = nn.Embedding.from_pretrained(grown, freeze=True)
                llm.config.tie_word_embeddings = False
                continue
            lin = model.get_submodule(name)
            assert isinstance(lin, nn.Linear) and lin.weight.shape == (q.out_features, q.in_features)
            lin.weight.copy_(q.dequantize_weight(dtype))
            if q.bias is not None:
                lin.bias.copy_(q.bias.to(dtype))
        # and every float tensor of the quantized checkpoint: norms with AWQ scales folded in, a flat layout's
        # dequantized projector
        params = dict(model.named_parameters())
        for key, p in quantized.named_parameters():
            assert key in params and params[key].shape == p.shape, key
            params[key].copy_(p)
    return model


def _greedy_equal(quantized_path, float_path, images) -> NVILAQwen2:
    """The quantized model's greedy answers are the dequantized float model's (its own generate and the
    cache-free oracle); returns the quantized model."""
    q = NVILAQwen2.load_pretrained(quantized_path, torch_dtype=torch.float32, device="cpu")
    f = _dequantized_float(float_path, q)
    prompt = ["Describe the image.", images["cat"]]
    text = q.generate_content(prompt, generation_config=GREEDY)
    assert text == f.generate_content(prompt, generation_config=GREEDY)
    assert_greedy_answer(f, prompt, text, GREEDY.max_new_tokens)
    return q


# ---------------------------------------------------------------------------------------------- pure functions
def test_head_rows_pad_the_runtime_vocabulary():
    assert head_rows(723, TOKENS) == ROWS
    assert head_rows(151648, 151651) == 151680  # NVILA-8B: 151651 rows fit no int4 layout
    assert head_rows(151936, 151665) == 151936  # Qwen2.5's stored vocabulary is padded already
    assert head_rows(ROWS, TOKENS) == ROWS


def test_settings_and_resume_fingerprint():
    on = AWQConfig(quantize_lm_head=True, lm_head_tokens=1024)
    assert AWQConfig.from_dict(on.to_dict()) == on
    assert {"quantize_lm_head", "lm_head_tokens"} <= set(on.search_fingerprint())
    # off: the fingerprint of a run made before the option existed, so its work folder still resumes
    assert not {"quantize_lm_head", "lm_head_tokens"} & set(AWQConfig().search_fingerprint())
    with pytest.raises(ConfigError, match="lm_head_tokens must be >= 1"):
        AWQConfig(quantize_lm_head=True, lm_head_tokens=0)


def test_sample_tokens_is_a_seeded_ordered_subset():
    hidden = [torch.arange(10.0 * i, 10.0 * i + 10).reshape(1, 5, 2) for i in range(3)]  # 15 tokens of width 2
    every = sample_tokens(hidden, 100, seed=0)
    assert torch.equal(every, torch.cat([h.reshape(-1, 2) for h in hidden]))
    a, b, c = sample_tokens(hidden, 6, seed=0), sample_tokens(hidden, 6, seed=0), sample_tokens(hidden, 6, seed=1)
    assert a.shape == (6, 2) and torch.equal(a, b) and not torch.equal(a, c)
    rows = [int(r[0]) // 2 for r in a]  # the rows' indices in the concatenation, in order and distinct
    assert rows == sorted(set(rows)) and torch.equal(a, every[rows])


def test_streaming_errors_equal_the_direct_computation(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    norm = nn.RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(32, generator=gen) + 0.5)
    w = torch.randn(200, 32, generator=gen)
    head = HeadModule(norm, nn.Linear(32, 200, bias=False))
    head.lm_head.weight = nn.Parameter(w, requires_grad=False)
    h = torch.randn(17, 32, generator=gen) * 3
    other_norm = norm.weight.detach() * 1.1
    other = w + 0.05 * torch.randn(200, 32, generator=gen)
    monkeypatch.setattr(head_module, "_CHUNK_VALUES", 17 * 48)  # 5 row chunks, the last one short
    got = streaming_errors(head, h, {"c": (other_norm, lambda r0, r1: other[r0:r1])})["c"]
    with torch.no_grad():
        ref = head(h)
        cand = nn.functional.linear(nn.functional.rms_norm(h, (32,), other_norm, 1e-6), other)
    assert got["mse"] == pytest.approx(float((ref - cand).pow(2).mean()), rel=1e-5)
    assert got["kl"] == pytest.approx(float(metrics.kl_divergence(ref, cand).mean()), rel=1e-4)


# ---------------------------------------------------------------------------------------------- round to nearest
def test_rtn_head_untied_autoawq(rtn_head, tiny_nvila, images):
    cfg = read_json(rtn_head / "llm" / "config.json")
    qc = cfg["quantization_config"]
    assert qc["lm_head"] is True and "lm_head" not in qc["modules_to_not_convert"]
    assert "lm_head" in cfg["nvila_quant"]["quantized_modules"]
    assert cfg["vocab_size"] == ROWS and cfg["tie_word_embeddings"] is False
    assert read_json(rtn_head / "config.json")["quantization_config"]["lm_head"] is True
    floats, qlinears, _ = read_quantized_submodel(rtn_head / "llm")
    assert "lm_head.weight" not in floats and qlinears["lm_head"].q.shape == (ROWS, 256)
    # the float head grown with the stored rows' mean (rounded to bf16), then rounded to nearest
    src = LLMBlocks.from_folder(load_config(tiny_nvila).part("llm"))
    stored = read_tensors(src.key_map, ["lm_head.weight", "model.embed_tokens.weight"])
    grown = torch.cat([stored["lm_head.weight"], mean_row(stored["lm_head.weight"], torch.bfloat16).expand(45, -1)])
    assert qlinears["lm_head"].equal(QTensor.from_float(grown.float(), 4, 128, True, scale_dtype=torch.bfloat16))
    emb = floats["model.embed_tokens.weight"]  # (768, H): the stored rows, then their mean
    assert emb.shape == (ROWS, 256) and torch.equal(emb[:723], stored["model.embed_tokens.weight"])
    assert torch.equal(emb[723:], mean_row(stored["model.embed_tokens.weight"], torch.bfloat16).expand(45, -1))
    assert torch.equal(floats["model.norm.weight"], read_tensors(src.key_map, ["model.norm.weight"])[
        "model.norm.weight"])  # no scales without calibration

    q = _greedy_equal(rtn_head, tiny_nvila, images)
    assert isinstance(q.llm.lm_head, QuantLinear) and q.llm.lm_head.out_features == ROWS
    assert q.llm.get_input_embeddings().weight.shape[0] == ROWS and len(q.tokenizer) == TOKENS
    with pytest.raises(CheckpointError, match="cannot be grown at load"):
        q._grow_embeddings(ROWS + 1)


def test_lite_tied_head_is_untied(tmp_path, images):
    lite = make_tiny(tmp_path / "lite-tied", TinySpec(variant="nvila-lite", seed=1, tie_embeddings=True))
    stored = read_tensors(LLMBlocks.from_folder(load_config(lite).part("llm")).key_map,
                          ["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    float_model = NVILAQwen2.load_pretrained(lite, torch_dtype=torch.float32, device="cpu")
    assert float_model.llm.lm_head.weight is float_model.llm.get_input_embeddings().weight  # tied as stored
    out = tmp_path / "q"
    assert main(["rtn", "--model", str(lite), "--output", str(out), "--quantize-lm-head", "--format", "tinychat",
                 "--quiet"]) == 0
    cfg = read_json(out / "llm" / "config.json")
    assert cfg["tie_word_embeddings"] is False and cfg["vocab_size"] == ROWS
    assert cfg["quantization_config"]["lm_head"] is True and cfg["quantization_config"]["version"] == "gemv_fast"
    floats, qlinears, _ = read_quantized_submodel(out / "llm")
    emb = floats["model.embed_tokens.weight"]  # embed_tokens stays float, the head is its own packed tensor
    assert torch.equal(emb[:724], stored) and emb.shape == (ROWS, stored.shape[1])
    assert qlinears["lm_head"].equal(QTensor.from_float(emb.float(), 4, 128, True, scale_dtype=torch.bfloat16))
    q = _greedy_equal(out, lite, images)
    assert isinstance(q.llm.lm_head, QuantLinear)
    assert not isinstance(q.llm.get_input_embeddings(), QuantLinear) and len(q.tokenizer) == 727


def test_refusals(tiny_nvila, tmp_path):
    """TensorRT-LLM's PyTorch backend keeps lm_head float: a symmetric int4 head (otherwise exportable) is refused;
    the head needs the LLM among the targets; both flags are in the help of both commands."""
    out = tmp_path / "sym"
    assert main(["rtn", "--model", str(tiny_nvila), "--output", str(out), "--quantize-lm-head", "--no-zero-point",
                 "--quiet"]) == 0
    with pytest.raises(ConfigError, match="lm_head is int4 .* float LMHead"):
        check_trtllm(load_config(out).part("llm"))
    with pytest.raises(ConfigError, match="add 'llm' to targets"):
        AWQConfig(quantize_lm_head=True, targets="projector")
    assert main(["rtn", "--model", str(tiny_nvila), "--output", str(tmp_path / "x"), "--quantize-lm-head",
                 "--targets", "projector"]) == 2
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert all("--quantize-lm-head" in sub.choices[c].format_help() for c in ("awq", "rtn"))


def test_flat_layout_keeps_the_head_int4(tiny_nvila, tmp_path, images):
    """``--layout hf`` (what SGLang serves): the head stays packed and the root config says so."""
    out = tmp_path / "hf"
    assert main(["rtn", "--model", str(tiny_nvila), "--output", str(out), "--layout", "hf", "--quantize-lm-head",
                 "--quiet"]) == 0
    qc = read_json(out / "config.json")["quantization_config"]
    assert qc["lm_head"] is True and not any(m.endswith("lm_head") for m in qc["modules_to_not_convert"])
    assert "llm.lm_head.qweight" in read_json(out / "model.safetensors.index.json")["weight_map"]
    assert check_sglang_checkpoint(out, stock_geometry=False) == []  # SGLang's rules: "lm_head": true -> int4 head
    q = _greedy_equal(out, tiny_nvila, images)
    assert isinstance(q.llm.lm_head, QuantLinear)


# ---------------------------------------------------------------------------------------------- AWQ
def test_awq_head_search_clip_and_results(awq_head, tiny_nvila, images):
    log = awq_head.log["lm_head"]
    assert log["rows"] == ROWS and log["tokens"] == 512  # a subset of the calibration tokens
    (group,) = log["groups"]
    assert (group["name"], group["prev_op"], group["linears"]) == ("lm_head", "model.norm", ["lm_head"])
    # the grid's guarantees: ratio 0 is plain RTN, the first minimum wins, so the search never loses to RTN
    assert len(group["losses"]) == 20 and group["rtn_loss"] == group["losses"][0]
    assert group["awq_loss"] == min(group["losses"]) <= group["rtn_loss"]
    assert group["ratio"] == group["losses"].index(group["awq_loss"]) / 20
    assert 0.5 <= log["clip"]["lm_head"] <= 1.0  # the mean kept fraction of absmax, within the clip grid
    assert log["kl_rtn"] > 0 and log["kl_awq"] > 0 and log["mse_rtn"] > 0
    assert awq_head.log["summary"]["lm_head"]["kl_awq"] == log["kl_awq"]

    cfg = read_json(awq_head.output / "llm" / "config.json")["quantization_config"]
    assert cfg["config_groups"]["group_0"]["targets"] == ["Linear", "lm_head"] and "lm_head" not in cfg["ignore"]

    # the saved scales and clips, re-applied to the grown float head, give the packed head back bit for bit
    meta, tensors = read_awq_results(awq_head.output / "awq_results.safetensors")
    (g,) = [g for g in meta["groups"] if g["linears"] == ["llm.lm_head"]]
    assert g["prev_op"] == "llm.model.norm" and "llm.lm_head" in meta["clips"]
    head = LLMBlocks.from_folder(load_config(tiny_nvila).part("llm")).load_head(ROWS, torch.float32,
                                                                                 torch.device("cpu"))
    state = {k: v.detach() for k, v in head.state_dict().items()}
    apply_scales(state, HEAD_GROUP, tensors[f"scale.{g['key']}"])
    apply_clip(state, "lm_head", tensors["clip.llm.lm_head"])
    floats, qlinears, _ = read_quantized_submodel(awq_head.output / "llm")
    assert qlinears["lm_head"].equal(QTensor.from_float(state["lm_head.weight"], 4, 128, True,
                                                        scale_dtype=torch.bfloat16))
    assert torch.equal(floats["model.norm.weight"], state["model.norm.weight"].to(torch.bfloat16))
    # the whole float model lacks the padded rows: re-applying says so instead of failing on a reshape
    with pytest.raises(CheckpointError, match="grow the model's head"):
        apply_awq_results(NVILAQwen2.load_pretrained(tiny_nvila, torch_dtype=torch.float32, device="cpu"),
                          awq_head.output / "awq_results.safetensors")

    q = _greedy_equal(awq_head.output, tiny_nvila, images)
    assert isinstance(q.llm.lm_head, QuantLinear)


class _Crash(RuntimeError):
    """Stands for a process killed after the head's result was saved."""


def _crash_after(index: int):  # noqa: ANN202 (an on_block_done callback)
    def on_block_done(block: int) -> None:
        if block == index:
            raise _Crash(f"crash after {block}")

    return on_block_done


@pytest.mark.slow
def test_resume_after_the_head_reuses_it(awq_head, tiny_nvila, tmp_path):
    out = tmp_path / "resumed"
    run = functools.partial(quantize, tiny_nvila, AWQConfig(**HEAD_AWQ), "builtin", out, progress=False)
    with pytest.raises(_Crash):
        run(on_block_done=_crash_after(4))  # 4 = num_hidden_layers: the head
    saved = load_block_result(work_dir_for(out) / "lm_head.safetensors").log
    with pytest.raises(ConfigError, match="cannot resume"):  # the head is part of the settings fingerprint
        quantize(tiny_nvila, AWQConfig(**{**HEAD_AWQ, "lm_head_tokens": 256}), "builtin", out, resume=True,
                 progress=False)
    result = run(resume=True)
    assert result.log["lm_head"] == saved  # loaded from the work folder, not searched again
    fa, qa, sa = read_quantized_submodel(out / "llm")  # and the checkpoint is the uninterrupted run's
    fb, qb, sb = read_quantized_submodel(awq_head.output / "llm")
    assert sa == sb and fa.keys() == fb.keys() and qa.keys() == qb.keys()
    assert all(torch.equal(fa[k], fb[k]) for k in fa) and all(qa[k].equal(qb[k]) for k in qa)


@pytest.mark.cuda
def test_int4_head_on_cuda(rtn_head):
    """The packed head takes the CUDA kernels (768 rows: the mma layout's multiple of 32) and agrees with the
    reference backend (exact dequantization + F.linear)."""
    from nvila_quant.model.quantized import set_backend

    model = NVILAQwen2.load_pretrained(rtn_head, torch_dtype=torch.float16, device="cuda")
    ref = NVILAQwen2.load_pretrained(rtn_head, torch_dtype=torch.float16, device="cuda")
    set_backend(ref, "reference")
    ids = torch.tensor([model.tokenizer("a cat sits on the mat and looks at the camera")["input_ids"]], device="cuda")
    with torch.inference_mode():
        a, b = model.llm(input_ids=ids).logits.float(), ref.llm(input_ids=ids).logits.float()
    head = model.llm.lm_head
    assert isinstance(head, QuantLinear) and head.resolve_backend(torch.device("cuda"), torch.float16) == "cuda"
    assert head.q_layout == "mma" and a.shape[-1] == ROWS
    assert float((a - b).norm() / b.norm()) < 1e-2
