"""The quantized runtime: NVILAQwen2.load_pretrained on packed llm/ + mm_projector/ in all three formats.

Checkpoints are built with the engine's round to nearest (``write_rtn_checkpoint``, no calibration) and converted
between formats with ``convert_quantized_folder``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from greedy_oracle import assert_greedy_answer
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GenerationConfig

from nvila_quant.errors import CheckpointError
from nvila_quant.formats import FORMATS
from nvila_quant.io import INDEX_NAME, SINGLE_NAME
from nvila_quant.kernels.cpu import cpu_settings
from nvila_quant.kernels.linear import QuantLinear
from nvila_quant.model import NVILAQwen2
from nvila_quant.model.quantized import convert_quantized_folder, quantized_modules, set_backend
from nvila_quant.quant.rtn import write_rtn_checkpoint
from nvila_quant.settings import overrides

GREEDY = GenerationConfig(max_new_tokens=12, do_sample=False)


def _convert(src: Path, dst: Path, fmt: str) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("llm", "mm_projector"))
    for sub in ("llm", "mm_projector"):
        convert_quantized_folder(src / sub, dst / sub, fmt)
    return dst


@pytest.fixture(scope="module")
def quantized(tiny_nvila: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny NVILA RTN-quantized (4-bit, g128, llm + projector) in each format (bit-identical codes)."""
    root = tmp_path_factory.mktemp("quantized")
    out = {"autoawq": write_rtn_checkpoint(tiny_nvila, root / "autoawq", "autoawq")}
    for fmt in FORMATS[1:]:
        out[fmt] = _convert(out["autoawq"], root / fmt, fmt)
    return out


def _dequantized_float(float_path: Path, quantized_model: NVILAQwen2, dtype: torch.dtype) -> NVILAQwen2:
    """The float checkpoint (standard loader) with every quantized linear's weight set to its dequantized value."""
    model = NVILAQwen2.load_pretrained(float_path, torch_dtype=dtype, device="cpu")
    with torch.no_grad():
        for name, q in quantized_modules(quantized_model).items():
            lin = model.get_submodule(name)
            assert isinstance(lin, nn.Linear) and lin.weight.shape == (q.out_features, q.in_features)
            lin.weight.copy_(q.dequantize_weight(dtype))
            if q.bias is not None:
                lin.bias.copy_(q.bias.to(dtype))
    return model


def _ids(model: NVILAQwen2, text: str = "a cat sits on the mat and looks at the camera") -> torch.Tensor:
    return torch.tensor([model.tokenizer(text)["input_ids"]])


def test_each_format_loads_with_identical_logits(quantized: dict[str, Path]) -> None:
    logits = {}
    for fmt, path in quantized.items():
        model = NVILAQwen2.load_pretrained(path, torch_dtype=torch.bfloat16, device="cpu")
        mods = quantized_modules(model)
        assert len(mods) == 4 * 7 + 2 and all(m.bits == 4 for m in mods.values())
        assert isinstance(model.get_mm_projector().layers[2], QuantLinear)
        assert {m.resolve_backend(torch.device("cpu"), torch.bfloat16) for m in mods.values()} == {"cpu"}
        with torch.inference_mode():
            logits[fmt] = model.llm(input_ids=_ids(model)).logits
    for fmt in FORMATS[1:]:
        assert torch.equal(logits[fmt], logits["autoawq"]), fmt


def test_loading_unpacks_one_linear_at_a_time(quantized: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader streams: each packed linear is read, unpacked and packed into its QuantLinear before the next is
    read, so the model is never held in its canonical form (one uint8 per weight) all at once."""
    import gc
    import weakref

    from nvila_quant.formats import checkpoint

    made: list[weakref.ref] = []
    most_alive = 0
    real = checkpoint.unpack_linear

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        nonlocal most_alive
        qt = real(*args, **kwargs)
        made.append(weakref.ref(qt))
        gc.collect()
        most_alive = max(most_alive, sum(r() is not None for r in made))
        return qt

    monkeypatch.setattr(checkpoint, "unpack_linear", counting)
    model = NVILAQwen2.load_pretrained(quantized["autoawq"], torch_dtype=torch.bfloat16, device="cpu")
    assert len(made) == len(quantized_modules(model)) == 4 * 7 + 2
    assert most_alive <= 2  # the one just read, and the previous one until the loop lets go of it


def test_greedy_output_equals_dequantized_float_model(quantized: dict[str, Path], tiny_nvila: Path,
                                                      images: dict) -> None:
    path = quantized["compressed-tensors"]
    q = NVILAQwen2.load_pretrained(path, torch_dtype=torch.float32, device="cpu")
    f = _dequantized_float(tiny_nvila, q, torch.float32)
    for prompt in (["Describe the image.", images["cat"]], ["hello world, how are"]):
        assert (q.generate_content(prompt, generation_config=GREEDY)
                == f.generate_content(prompt, generation_config=GREEDY))
    # bf16 with the few-token int4 kernel on every token: logits within bf16 tolerance of the dequantized model
    qb = NVILAQwen2.load_pretrained(path, torch_dtype=torch.bfloat16, device="cpu")
    fb = _dequantized_float(tiny_nvila, qb, torch.bfloat16)
    with torch.inference_mode(), overrides(cpu_settings(), dense_min_tokens=100000):
        a, b = qb.llm(input_ids=_ids(qb)).logits.float(), fb.llm(input_ids=_ids(fb)).logits.float()
    assert float((a - b).norm() / b.norm()) < 2e-2


def test_generate_stream_and_benchmark_on_quantized(quantized: dict[str, Path], tiny_nvila: Path) -> None:
    model = NVILAQwen2.load_pretrained(quantized["tinychat"], torch_dtype=torch.bfloat16, device="cpu")
    text = model.generate_content(["What is in the picture?"], generation_config=GREEDY)
    streamed = "".join(model.stream_content(["What is in the picture?"], generation_config=GREEDY))
    assert streamed.strip() == text.strip() and text
    result = model.benchmark(["Describe a cat."], max_new_tokens=4, quiet=True)
    assert result["decode_tokens_per_s"] > 0
    ids = _ids(model)
    full, _ = model.stream_gen(ids)  # prefill, then one cached decode step == the same positions in one pass
    step, n = model.stream_gen(ids[:, -1:], start_pos=ids.shape[1] - 1)
    # as close as bf16 lets two computations of the same logits be: within what bf16 arithmetic moves them from the
    # fp32 model with the same (dequantized) weights, and a few units in the last place
    with torch.inference_mode():
        exact = _dequantized_float(tiny_nvila, model, torch.float32).llm(input_ids=ids).logits[0, -1]
    bf16_error = float((full[0, -1].float() - exact).abs().max())
    ulps = 4 * torch.finfo(torch.bfloat16).eps * float(full[0, -1].abs().max())
    assert n == 1 and float((step[0, -1] - full[0, -1]).abs().max()) <= max(2 * bf16_error, ulps)
    set_backend(model, "reference")
    assert {m.backend for m in quantized_modules(model).values()} == {"reference"}
    with pytest.raises(ValueError, match="backend must be one of"):
        set_backend(model, "tpu")


def test_lite_group_fallbacks_and_reference_backend(tiny_nvila_lite: Path, tmp_path: Path, images: dict) -> None:
    """Lite projector: Linear(576,192), (192,256), (256,256). 576 and 192 fall back to group 64 (still the int4
    kernel); 8-bit compressed-tensors weights run the reference backend everywhere."""
    g128 = write_rtn_checkpoint(tiny_nvila_lite, tmp_path / "g128", "autoawq", targets=("projector",))
    model = NVILAQwen2.load_pretrained(g128, torch_dtype=torch.float32, device="cpu")
    layers = model.get_mm_projector().layers
    assert [(layers[i].in_features, layers[i].group_size) for i in (2, 5, 7)] == [(576, 64), (192, 64), (256, 128)]
    assert not quantized_modules(model.llm)  # targets=("projector",): llm/ stays float
    meta = json.loads((g128 / "mm_projector" / "config.json").read_text())["nvila_quant"]
    assert meta["module_overrides"] == {"layers.2": {"group_size": 64}, "layers.5": {"group_size": 64}}
    f = _dequantized_float(tiny_nvila_lite, model, torch.float32)
    prompt = ["Describe the image.", images["rocket"]]
    assert (model.generate_content(prompt, generation_config=GREEDY)
            == f.generate_content(prompt, generation_config=GREEDY))

    w8 = write_rtn_checkpoint(tiny_nvila_lite, tmp_path / "w8", "compressed-tensors", bits=8, group_size=32)
    model8 = NVILAQwen2.load_pretrained(w8, torch_dtype=torch.bfloat16, device="cpu")
    mods = quantized_modules(model8)
    assert {m.bits for m in mods.values()} == {8}
    assert {m.resolve_backend(torch.device("cpu"), torch.bfloat16) for m in mods.values()} == {"reference"}
    f8 = _dequantized_float(tiny_nvila_lite, model8, torch.bfloat16)  # the same weights, dequantized, in bf16
    assert (model8.generate_content(prompt, generation_config=GREEDY)
            == f8.generate_content(prompt, generation_config=GREEDY))


# ---------------------------------------------------------------------------------------------- bad checkpoints
def _edit_llm(root: Path, edit) -> None:  # noqa: ANN001
    path = root / "llm" / SINGLE_NAME
    state = edit(load_file(str(path)))
    save_file(state, str(path), metadata={"format": "pt"})
    index = json.loads((root / "llm" / INDEX_NAME).read_text())
    index["weight_map"] = {k: SINGLE_NAME for k in state}
    (root / "llm" / INDEX_NAME).write_text(json.dumps(index))


def test_bad_checkpoints_give_clear_errors(quantized: dict[str, Path], tmp_path: Path) -> None:
    target = "model.layers.1.mlp.up_proj"

    def case(name: str) -> Path:
        return Path(shutil.copytree(quantized["autoawq"], tmp_path / name))

    missing = case("missing")
    _edit_llm(missing, lambda s: {k: v for k, v in s.items() if k != f"{target}.qzeros"})
    with pytest.raises(CheckpointError, match=f"{target} lacks 'qzeros'"):
        NVILAQwen2.load_pretrained(missing, device="cpu")

    shapes = case("shapes")
    _edit_llm(shapes, lambda s: {**s, f"{target}.scales": s[f"{target}.scales"][:1]})
    with pytest.raises(CheckpointError, match=rf"{target}.scales .* has shape \(1, 640\), expected \(2, 640\)"):
        NVILAQwen2.load_pretrained(shapes, device="cpu")

    metadata = case("metadata")
    cfg_path = metadata / "llm" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["group_size"] = 64
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="disagrees with quantization_config"):
        NVILAQwen2.load_pretrained(metadata, device="cpu")

    renamed = case("renamed")
    bogus = "model.layers.1.mlp.upp_proj"
    _edit_llm(renamed, lambda s: {k.replace(target, bogus): v for k, v in s.items()})
    cfg_path = renamed / "llm" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["nvila_quant"]["quantized_modules"] = [bogus if m == target else m
                                               for m in cfg["nvila_quant"]["quantized_modules"]]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"packed linear '{bogus}'"):
        NVILAQwen2.load_pretrained(renamed, device="cpu")

    projector = case("projector")
    mp_cfg = json.loads((projector / "mm_projector" / "config.json").read_text())
    mp_cfg["nvila_quant"]["quantized_modules"].append("layers.1")
    (projector / "mm_projector" / "config.json").write_text(json.dumps(mp_cfg))
    with pytest.raises(CheckpointError, match=r"no 'qweight' for \['layers.1'\]"):
        NVILAQwen2.load_pretrained(projector, device="cpu")


@pytest.mark.cuda
def test_quantized_model_on_cuda(quantized: dict[str, Path], images: dict) -> None:
    model = NVILAQwen2.load_pretrained(quantized["autoawq"], torch_dtype=torch.float16, device="cuda")
    mods = quantized_modules(model)
    assert {m.resolve_backend(torch.device("cuda"), torch.float16) for m in mods.values()} == {"cuda"}
    ref = NVILAQwen2.load_pretrained(quantized["autoawq"], torch_dtype=torch.float16, device="cuda")
    set_backend(ref, "reference")
    with torch.inference_mode():
        a, b = (model.llm(input_ids=_ids(model).cuda()).logits.float(),
                ref.llm(input_ids=_ids(ref).cuda()).logits.float())
    assert float((a - b).norm() / b.norm()) < 1e-2
    text = model.generate_content(["Describe.", images["cat"]], generation_config=GREEDY)
    assert model.decode_session.static.graph is not None  # decode steps replayed a CUDA graph
    half_ulps = 4 * torch.finfo(torch.float16).eps * float(a.abs().max())
    assert_greedy_answer(ref, ["Describe.", images["cat"]], text, GREEDY.max_new_tokens, tolerance=half_ulps)
    assert {m.q_layout for m in mods.values()} == {"mma"}  # every tiny-model linear takes the tensor-core layout
