"""W8A8 of the vision tower: the int8 numerics against their formulas, SmoothQuant's search and folds, and the tower
quantized on the tiny model with planted outlier channels (smoothed W8A8 keeps the features, plain W8A8 does not)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from nvila_quant.kernels.int8 import Int8Linear, int8_linears
from nvila_quant.model import NVILAQwen2
from nvila_quant.numerics.int8 import (
    int8_matmul,
    quantize_tokens,
    quantize_weight,
    smooth_factors,
    w8a8_linear,
)
from nvila_quant.quant.vision import SMOOTH_GROUPS, VisionQuantConfig, _fold, quantize_tower, search_smoothing
from nvila_quant.testing.factory import TinySpec, make_tiny


# ---------------------------------------------------------------------------------------------- numerics
def test_int8_quantizers_are_the_symmetric_formulas():
    w = torch.randn(24, 40) * torch.linspace(0.1, 3, 24)[:, None]
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.shape == (24, 1) and int(q.abs().max()) == 127
    assert torch.equal(s, w.abs().amax(1, keepdim=True) / 127)
    assert torch.equal(q, torch.round(w / s).clamp(-127, 127).to(torch.int8))
    assert (q.float() * s - w).abs().max() <= s.max() / 2 + 1e-6
    x = torch.randn(7, 40)
    qx, sx = quantize_tokens(x)
    assert sx.shape == (7, 1) and torch.equal(sx, x.abs().amax(1, keepdim=True) / 127)
    assert torch.equal(quantize_tokens(torch.zeros(2, 40))[0], torch.zeros(2, 40, dtype=torch.int8))


@pytest.mark.parametrize("t,k,n", [(1, 64, 16), (5, 1152, 40), (33, 4304, 24)])
def test_int8_product_is_exact(t, k, n):
    qx = torch.randint(-127, 128, (t, k), dtype=torch.int8)
    qw = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    exact = qx.long() @ qw.long().t()
    assert torch.equal(int8_matmul(qx, qw).long(), exact)
    assert torch.equal(int8_matmul(qx, qw, exact_reference=True).long(), exact)


def test_w8a8_linear_and_module_match_the_formula_and_backends_agree():
    lin = torch.nn.Linear(96, 48)
    x = torch.randn(3, 5, 96)
    mod = Int8Linear.from_linear(lin)
    qx, sx = quantize_tokens(x.reshape(-1, 96))
    acc = (qx.long() @ mod.weight.long().t()).float()
    want = (acc * sx * mod.weight_scale.view(1, -1) + lin.bias).reshape(3, 5, 48)
    y = mod(x)
    assert y.shape == (3, 5, 48) and torch.allclose(y, want, atol=1e-5)
    mod.backend = "reference"
    assert torch.allclose(mod(x), y, atol=1e-6)
    assert F.cosine_similarity(y.flatten(), lin(x).flatten(), dim=0) > 0.999
    assert torch.allclose(w8a8_linear(x, mod.weight, mod.weight_scale, lin.bias), y)


def test_smooth_factors_formula_and_fold_preserve_the_layer():
    xa, wa = torch.rand(32) * 10 + 0.1, torch.rand(32) + 0.1
    assert torch.allclose(smooth_factors(xa, wa, 0.5), xa.sqrt() / wa.sqrt())
    assert torch.allclose(smooth_factors(xa, wa, 1.0), xa) and torch.allclose(smooth_factors(xa, wa, 0.0), 1 / wa)
    spec = TinySpec(seed=0)
    from nvila_quant.testing.factory import _vision

    vision = _vision(spec, torch.Generator().manual_seed(0))
    layer = getattr(vision, "vision_model", vision).encoder.layers[0].float().eval()
    with torch.no_grad():
        layer.layer_norm1.bias.normal_()
        layer.layer_norm2.bias.normal_()
    h = torch.randn(2, 10, spec.vision_hidden)
    before = layer(h, None)
    before = before[0] if isinstance(before, tuple) else before
    for g in SMOOTH_GROUPS[:3]:
        width = layer.get_submodule(g.linears[0]).weight.shape[1]
        _fold(layer, g, torch.rand(width) * 4 + 0.25)
    after = layer(h, None)
    after = after[0] if isinstance(after, tuple) else after
    assert torch.allclose(before, after, atol=1e-4)


def test_search_picks_smoothing_for_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=g)
    x[:, :4] *= 60  # outlier channels: per-token int8 scales blow up for every other channel
    w = torch.randn(64, 128, generator=g) / 128**0.5
    alpha, m, rel, tried = search_smoothing(x, x.abs().amax(0), [w], [None], [0.25, 0.5, 0.75], True)
    plain = next(t for t in tried if t["alpha"] is None)["rel_error"]
    assert alpha is not None and rel[0] < 0.2 * plain
    assert [t["alpha"] for t in tried] == [None, 0.25, 0.5, 0.75]
    none, *_ = search_smoothing(x, x.abs().amax(0), [w], [None], [0.5], False)  # nothing to fold into
    assert none is None


# ---------------------------------------------------------------------------------------------- the tower
@pytest.fixture(scope="module")
def outlier_nvila(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("vis") / "m", TinySpec(seed=0, vision_outliers=True, vision_layers=4))


def _tiles(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    size = model.vision_tower.image_size
    return torch.rand(3, 3, size, size, generator=g) * 2 - 1


def test_smoothed_w8a8_tower_keeps_the_features_plain_does_not(outlier_nvila):
    model = NVILAQwen2.load_pretrained(outlier_nvila, torch_dtype=torch.float32, device="cpu")
    tiles, held_out = _tiles(model), torch.rand(2, 3, model.vision_tower.image_size, model.vision_tower.image_size)
    held_out = held_out * 2 - 1
    ref = model.vision_tower(held_out)
    towers = {}
    for name, alphas in (("smooth", VisionQuantConfig().alphas), ("plain", ())):
        tower = copy.deepcopy(model.vision_tower)
        res = quantize_tower(tower, tiles, VisionQuantConfig(alphas=alphas, max_error=1.0), progress=False)
        towers[name] = (tower, res)
    with torch.no_grad():
        cos = {n: float(F.cosine_similarity(t(held_out).flatten(1), ref.flatten(1), dim=1).min())
               for n, (t, _) in towers.items()}
    assert cos["smooth"] >= 0.999 > cos["plain"], cos
    tower, res = towers["smooth"]
    used = model.vision_tower.num_layers_used
    assert len(res.quantized) == 6 * used and len(int8_linears(tower)) == 6 * used
    assert all(n.startswith("vision_model.encoder.layers.") for n in res.quantized + res.kept_float)
    chosen = [g["alpha"] for layer in res.log["layers"] for g in layer["groups"]]
    assert any(a is not None for a in chosen) and chosen[3::4] == [None] * used  # fc2: nothing to fold into
    # a tight threshold keeps the worst linears float, listed
    strict = quantize_tower(copy.deepcopy(model.vision_tower), tiles, VisionQuantConfig(alphas=(), max_error=1e-6),
                            progress=False)
    assert not strict.quantized and len(strict.kept_float) >= 6 * used


def test_saved_tower_reloads_as_int8_and_matches(outlier_nvila, tmp_path):
    import shutil

    from nvila_quant.formats.compressed_tensors import check_int8_config
    from nvila_quant.io import read_json
    from nvila_quant.model.config import load_config
    from nvila_quant.quant.vision import save_tower

    model = NVILAQwen2.load_pretrained(outlier_nvila, torch_dtype=torch.float32, device="cpu")
    tower = copy.deepcopy(model.vision_tower)
    res = quantize_tower(tower, _tiles(model), VisionQuantConfig(max_error=0.01), progress=False)
    folder = tmp_path / "q"
    shutil.copytree(outlier_nvila, folder, ignore=shutil.ignore_patterns("vision_tower"))
    save_tower(tower, res, load_config(outlier_nvila).part("vision_tower"), folder / "vision_tower", torch.float32)
    qc = read_json(folder / "vision_tower" / "config.json")["quantization_config"]
    assert check_int8_config(qc, "test") == sorted(res.kept_float) and qc["format"] == "int-quantized"
    again = NVILAQwen2.load_pretrained(folder, torch_dtype=torch.float32, device="cpu")
    loaded = int8_linears(again.vision_tower)
    assert len(loaded) == len(res.quantized)
    x = torch.rand(1, 3, model.vision_tower.image_size, model.vision_tower.image_size) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(again.vision_tower(x), tower(x), atol=1e-5)
        for m in loaded.values():
            m.backend = "reference"
        assert torch.allclose(again.vision_tower(x), tower(x), atol=1e-4)
    # the config and the tensors must agree: a float weight where the config says int8 is refused
    from safetensors.torch import load_file, save_file

    shard = next((folder / "vision_tower").glob("*.safetensors"))
    tensors = load_file(str(shard))
    key = next(k.removesuffix("_scale") for k in tensors if k.endswith(".weight_scale"))
    tensors[key] = tensors[key].float()
    save_file(tensors, str(shard))
    with pytest.raises(Exception, match="no int8 weight"):
        NVILAQwen2.load_pretrained(folder, torch_dtype=torch.float32, device="cpu")


def test_awq_with_vision_tower_target_end_to_end(outlier_nvila, tmp_path):
    from nvila_quant.cli import main
    from nvila_quant.errors import ConfigError
    from nvila_quant.quant.config import AWQConfig
    from nvila_quant.quant.runner import quantize

    cfg = AWQConfig(targets="llm,projector,vision_tower", format="compressed-tensors", n_samples=4, text_ratio=0.5,
                    seqlen=256, vision_tiles=6)
    res = quantize(outlier_nvila, cfg, "builtin", tmp_path / "q", progress=False)
    vlog = res.log["vision_tower"]
    assert vlog["tiles"] == 6 and vlog["tiles_available"] >= 6 and vlog["quantized"]
    assert res.log["summary"]["vision_tower"]["quantized"] == len(vlog["quantized"])
    model = NVILAQwen2.load_pretrained(tmp_path / "q", torch_dtype=torch.float32, device="cpu")
    assert len(int8_linears(model.vision_tower)) == len(vlog["quantized"])
    ref = NVILAQwen2.load_pretrained(outlier_nvila, torch_dtype=torch.float32, device="cpu")
    x = torch.rand(2, 3, ref.vision_tower.image_size, ref.vision_tower.image_size) * 2 - 1
    with torch.no_grad():
        cos = F.cosine_similarity(model.vision_tower(x).flatten(1), ref.vision_tower(x).flatten(1), dim=1)
    assert float(cos.min()) > 0.99
    assert main(["info", str(tmp_path / "q")]) == 0
    # refused before any work: formats that cannot state int8 activations, rtn, text-only calibration, flat layout
    with pytest.raises(ConfigError, match="compressed-tensors"):
        AWQConfig(targets="llm,vision_tower")
    with pytest.raises(ConfigError, match="not rtn"):
        AWQConfig(method="rtn", targets="vision_tower", format="compressed-tensors")
    with pytest.raises(ConfigError, match="needs image samples"):
        quantize(outlier_nvila, AWQConfig(targets="vision_tower", format="compressed-tensors", text_ratio=1.0,
                                          n_samples=2), "builtin", tmp_path / "t", progress=False)
    with pytest.raises(ConfigError, match="three-folder layout"):
        quantize(outlier_nvila, cfg, "builtin", tmp_path / "h", progress=False, layout="hf")
    assert not (tmp_path / "t").exists() and not (tmp_path / "h").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_quantize_and_rescale_are_bitwise_the_torch_ops(dtype):
    from nvila_quant.kernels.int8 import native_w8a8

    lin = torch.nn.Linear(192, 80).to(dtype)
    mod = Int8Linear.from_linear(lin)
    x = (torch.randn(2, 37, 192) * torch.linspace(0.01, 30, 192)).to(dtype)
    x[0, 3] = 0  # an all-zero token: the scale's floor
    y = native_w8a8(x, mod._transposed(), mod.weight_scale, mod.bias)
    if y is None:
        pytest.skip("the native CPU library is not available")
    assert y.dtype == dtype and torch.equal(y, w8a8_linear(x, mod.weight, mod.weight_scale, mod.bias))
    assert torch.equal(native_w8a8(x, mod._transposed(), mod.weight_scale, None),
                       w8a8_linear(x, mod.weight, mod.weight_scale, None))
