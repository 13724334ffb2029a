"""`nvila-export onnx`: graphs, export.json, onnxruntime == PyTorch, the onnx runtime backend, bad inputs.

The tiny NVILA and NVILA-Lite are exported (and verified) once per session.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from einops import rearrange
from transformers import GenerationConfig

from nvila_quant.errors import CheckpointError, ConfigError, MediaError
from nvila_quant.export import ExportOptions, VerificationError, export_onnx, load_vision_source
from nvila_quant.export.graphs import S2Merge
from nvila_quant.model import NVILAQwen2
from nvila_quant.model.onnx_vision import OnnxVisionGraphs, OnnxVisionTower
from nvila_quant.model.vision import merge_features_for_dynamic_s2, split_chessboard

FP32_REL = 1e-4

REPO = Path(__file__).resolve().parents[2]


def rel_err(ref: np.ndarray | torch.Tensor, out: np.ndarray | torch.Tensor) -> float:
    ref, out = np.asarray(ref, dtype=np.float64), np.asarray(out, dtype=np.float64)
    assert ref.shape == out.shape
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="session")
def nvila_export(tiny_nvila, tmp_path_factory):
    """The tiny NVILA exported with its projector (fp32, verified)."""
    out = tmp_path_factory.mktemp("onnx") / "nvila"
    manifest = export_onnx(tiny_nvila, out, ExportOptions(include_projector=True), progress=False)
    return out, manifest


@pytest.fixture(scope="session")
def lite_export(tiny_nvila_lite, tmp_path_factory):
    """The tiny NVILA-Lite exported with its projector (fp32, verified)."""
    out = tmp_path_factory.mktemp("onnx") / "nvila-lite"
    manifest = export_onnx(tiny_nvila_lite, out, ExportOptions(include_projector=True), progress=False)
    return out, manifest


@pytest.fixture(scope="session")
def onnx_model(tiny_nvila, nvila_export):
    """The tiny NVILA with its vision tower running through onnxruntime (fp32, CPU)."""
    return NVILAQwen2.load_pretrained(
        tiny_nvila, torch_dtype=torch.float32, device="cpu", vision_backend="onnx", onnx_dir=nvila_export[0]
    )


# ---------------------------------------------------------------------------- export + export.json
def test_export_nvila_graphs_and_manifest(nvila_export, tiny_nvila):
    out, manifest = nvila_export
    for name in ("vision_tower.onnx", "vision_tower.onnx.data", "s2.onnx", "projector.onnx", "projector.onnx.data"):
        assert (out / name).is_file(), name
    assert json.loads((out / "export.json").read_text()) == json.loads(json.dumps(manifest, default=str))
    assert manifest["opset"] == 18 and manifest["dtype"] == "fp32" and manifest["max_tiles"] == 17
    assert manifest["source"]["checkpoint"] == str(tiny_nvila.absolute())
    tower = manifest["graphs"]["vision_tower"]
    assert tower["inputs"] == [{"name": "pixel_values", "shape": ["num_tiles", 3, 448, 448], "dtype": "float32"}]
    assert tower["outputs"] == [{"name": "features", "shape": ["num_tiles", 1024, 64], "dtype": "float32"}]
    assert tower["dynamic_axes"]["pixel_values"] == {"0": "num_tiles"} and tower["opset"] == 18
    assert manifest["vision"]["layers_exported"] == 2 and manifest["vision"]["post_layernorm"] is False
    s2 = manifest["graphs"]["s2"]
    assert [i["shape"] for i in s2["inputs"]] == [[1, 1024, 64], [4, 1024, 64], ["rows", "cols", 1024, 64]]
    assert s2["outputs"][0]["shape"][1:] == [1024, 192]
    assert "(rows, cols)" in manifest["s2"]["block_size"]  # the block size is the last input's shape
    proj = manifest["graphs"]["projector"]
    assert proj["inputs"][0]["shape"] == ["num_blocks", 1024, 192]
    assert proj["outputs"][0]["shape"] == ["num_blocks", 256, 256]
    assert manifest["projector"]["quantized_linears"] == 0
    # only the selected layers are in the graph: no post-layernorm, no layer 2
    portable = onnx.load(str(out / "vision_tower.onnx"), load_external_data=False)
    names = {i.name for i in portable.graph.initializer}
    assert not any("post_layernorm" in n or "layers.2." in n for n in names)
    assert {n.domain for n in portable.graph.node} == {""}  # standard ops only: what TensorRT parses


def test_export_onnxruntime_graph(nvila_export):
    """vision_tower.ort.onnx: fused attention + GELU, same IO, reads the portable graph's weights file."""
    out, manifest = nvila_export
    spec = manifest["optimized"]["vision_tower"]
    assert spec["file"] == "vision_tower.ort.onnx" and spec["external_data"] == "vision_tower.onnx.data"
    assert spec["fused_ops"] == {"MultiHeadAttention": 2, "FastGelu": 2}  # one each per exported layer
    assert spec["inputs"] == manifest["graphs"]["vision_tower"]["inputs"]
    assert spec["outputs"] == manifest["graphs"]["vision_tower"]["outputs"]
    assert not (out / "vision_tower.ort.onnx.data").exists()  # weights shared, not copied
    graph = onnx.load(str(out / "vision_tower.ort.onnx"), load_external_data=False).graph
    assert not any(n.op_type in ("Softmax", "Tanh") for n in graph.node)
    shared = [i for i in graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert shared and {e.value for i in shared for e in i.external_data if e.key == "location"} == {
        "vision_tower.onnx.data"}
    runtimes = manifest["runtimes"]
    assert runtimes["onnxruntime"] == {"vision_tower": "vision_tower.ort.onnx", "s2": "s2.onnx",
                                       "projector": "projector.onnx"}
    assert runtimes["tensorrt"]["vision_tower"] == "vision_tower.onnx"
    graphs = OnnxVisionGraphs(out)
    assert graphs.graph_file("vision_tower").name == "vision_tower.ort.onnx" and graphs.tile_batch == 1
    assert OnnxVisionGraphs(out, optimized=False).graph_file("vision_tower").name == "vision_tower.onnx"
    assert OnnxVisionGraphs(out, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]).tile_batch is None
    with pytest.raises(ConfigError, match="tile_batch"):
        OnnxVisionGraphs(out, tile_batch=0)


def test_optimize_writes_nothing_without_attention_or_on_failure(nvila_export, tmp_path, monkeypatch, caplog):
    import shutil

    from nvila_quant.export import ort_graph

    out = nvila_export[0]
    for name in ("s2.onnx", "s2.onnx.data", "vision_tower.onnx", "vision_tower.onnx.data"):
        if (out / name).exists():
            shutil.copy(out / name, tmp_path / name)
    assert ort_graph.optimize_for_onnxruntime(tmp_path / "s2.onnx", 0) is None  # no attention: nothing to gain
    monkeypatch.setattr(ort_graph, "_fusions", lambda: 1 / 0)
    assert ort_graph.optimize_for_onnxruntime(tmp_path / "vision_tower.onnx", 2) is None
    assert "optimization skipped (ZeroDivisionError" in caplog.text
    assert not list(tmp_path.glob("*.ort.onnx"))


def test_export_verification_covers_aspect_ratios(nvila_export):
    ver = nvila_export[1]["verification"]
    assert ver["passed"] and ver["providers"] == ["CPUExecutionProvider"]
    # what the runtime uses (optimized graph, one tile per call on CPU), and the portable graph TensorRT builds from
    assert ver["graphs"] == {"vision_tower": "vision_tower.ort.onnx", "tile_batch": 1,
                             "vision_tower_portable": "vision_tower.onnx"}
    blocks = {tuple(c["block_sizes"][0]) for c in ver["cases"] if c["block_sizes"][0] is not None}
    assert {(3, 3), (3, 4), (4, 3), (2, 6)} <= blocks  # square, landscape, portrait, panorama
    assert {c["tiles"] for c in ver["cases"]} >= {14, 17, 4}  # several images: one tile each
    for name in ("vision_tower", "vision_tower_portable", "s2", "projector", "pipeline"):
        w = ver["worst"][name]
        assert w["rel"] <= FP32_REL and w["cosine"] > 0.99999, (name, w)
        assert {"max_abs", "rel", "cosine"} <= set(ver["cases"][0]["outputs"][name])


def test_export_nvila_lite(lite_export):
    out, manifest = lite_export
    assert manifest["graphs"]["s2"] is None and manifest["s2"] is None
    assert manifest["max_tiles"] == 13
    assert manifest["graphs"]["projector"]["outputs"][0]["shape"] == ["num_blocks", 121, 256]  # 3x3 downsample
    ver = manifest["verification"]
    assert ver["passed"] and len({c["tiles"] for c in ver["cases"]}) >= 3
    assert all(w["rel"] <= FP32_REL for w in ver["worst"].values())


def test_export_fp16(tiny_nvila_lite, tmp_path):
    manifest = export_onnx(tiny_nvila_lite, tmp_path / "fp16", ExportOptions(dtype="fp16", include_projector=True),
                           progress=False)
    tower = manifest["graphs"]["vision_tower"]
    assert tower["inputs"][0]["dtype"] == "float16" and tower["outputs"][0]["dtype"] == "float16"
    ver = manifest["verification"]
    assert ver["passed"] and ver["tolerance"]["rel"] == 2e-2
    assert ver["graphs"]["vision_tower"] == "vision_tower.ort.onnx"  # fp16 MultiHeadAttention runs on CPU too
    assert all(w["cosine"] > 0.999 for w in ver["worst"].values())


# ---------------------------------------------------------------------------- onnxruntime == PyTorch
def _encode_torch(model, prompt):
    media, media_config = model.prepare_media([{"from": "human", "value": prompt}])
    tiles = torch.stack(media["image"])
    blocks = media_config.get("image", {}).get("block_sizes")
    return tiles, blocks, model.encode_images(tiles, blocks)


@torch.inference_mode()
def test_ort_equals_pytorch_one_image_each_aspect_ratio(tiny_model, nvila_export, images):
    graphs = OnnxVisionGraphs(nvila_export[0])  # one session, different tile counts
    seen = set()
    for image in images.values():
        tiles, blocks, ref = _encode_torch(tiny_model, [image, "x"])
        out = graphs.encode(tiles.numpy(), blocks[0])  # (tokens, H)
        assert rel_err(ref[0], out) <= FP32_REL
        seen.add(tiles.shape[0])
    assert seen == {14, 17}


@torch.inference_mode()
def test_ort_equals_pytorch_several_images(tiny_model, nvila_export, images):
    graphs = OnnxVisionGraphs(nvila_export[0])
    tiles, blocks, ref = _encode_torch(tiny_model, [images["astronaut"], images["coffee"], images["rocket"], "x"])
    assert blocks is None and tiles.shape[0] == 3  # several images: one 448 tile each
    out = np.stack([graphs.encode(t[None], None) for t in tiles.numpy()])
    assert rel_err(ref, out) <= FP32_REL
    ref = tiny_model.get_vision_tower()(tiles)
    for tile_batch in (1, 3):  # one tile per call (CPU default), and the three tiles in one call (GPU default)
        features = OnnxVisionGraphs(nvila_export[0], tile_batch=tile_batch).run_tower(tiles.numpy())
        assert rel_err(ref, features) <= FP32_REL


@torch.inference_mode()
@pytest.mark.parametrize("block", [(1, 1), (1, 9), (2, 6), (5, 2), (3, 4)])
def test_s2_graph_block_sizes(nvila_export, block):
    graphs = OnnxVisionGraphs(nvila_export[0])
    rows, cols = block
    features = torch.randn(5 + rows * cols, 1024, 64, generator=torch.Generator().manual_seed(rows * 10 + cols))
    merged, new = merge_features_for_dynamic_s2(features, [block], [448, 896, 1344], -1)
    ref = rearrange(split_chessboard(merged[0], *new[0]), "b c h w -> b (h w) c")
    assert rel_err(ref, graphs.run_s2(features.numpy(), block)) <= 1e-6


@pytest.mark.parametrize("idx", [0, 1, -1])
def test_s2_merge_module_matches_reference(idx):
    module = S2Merge([448, 896, 1344], idx, 1024)
    for rows, cols in [(3, 3), (4, 3), (1, 9)]:
        f = torch.randn(5 + rows * cols, 1024, 8)
        merged, new = merge_features_for_dynamic_s2(f, [(rows, cols)], [448, 896, 1344], idx)
        ref = rearrange(split_chessboard(merged[0], *new[0]), "b c h w -> b (h w) c")
        out = module(f[:1], f[1:5], f[5:].reshape(rows, cols, 1024, 8))
        assert torch.allclose(out, ref, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- runtime backend
def test_onnx_backend_same_generation(tiny_model, onnx_model, images):
    assert isinstance(onnx_model.get_vision_tower(), OnnxVisionTower)
    assert not any(p.numel() for p in onnx_model.get_vision_tower().parameters())
    config = GenerationConfig(max_new_tokens=12, do_sample=False)
    for prompt in ([images["coffee"], "Describe the image."], [images["cat"], images["rocket"], "Compare them."]):
        expected = tiny_model.generate_content(prompt, config)
        assert onnx_model.generate_content(prompt, config) == expected
    prompt = [images["astronaut"], "What is this?"]
    assert "".join(onnx_model.stream_content(prompt, config)) == "".join(tiny_model.stream_content(prompt, config))


def test_onnx_backend_refuses_to_save(onnx_model, tmp_path):
    with pytest.raises(CheckpointError, match="vision_backend='torch'"):
        onnx_model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_onnx_backend_rejects_other_export(tiny_nvila, lite_export):
    with pytest.raises(CheckpointError, match="does not match"):
        NVILAQwen2.load_pretrained(tiny_nvila, torch_dtype=torch.float32, device="cpu",
                                   vision_backend="onnx", onnx_dir=lite_export[0])


@pytest.mark.parametrize("kwargs", [{"vision_backend": "onnx"}, {"vision_backend": "tensorrt", "onnx_dir": "x"}])
def test_onnx_backend_bad_arguments(tiny_nvila, kwargs):
    with pytest.raises(ConfigError, match="vision_backend|onnx_dir"):
        NVILAQwen2.load_pretrained(tiny_nvila, torch_dtype=torch.float32, device="cpu", **kwargs)


def test_onnx_backend_missing_folder(tiny_nvila, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        NVILAQwen2.load_pretrained(tiny_nvila, torch_dtype=torch.float32, device="cpu",
                                   vision_backend="onnx", onnx_dir=tmp_path / "none")


# ---------------------------------------------------------------------------- bad inputs
def test_tile_shapes_the_graph_does_not_accept(nvila_export, onnx_model):
    graphs = OnnxVisionGraphs(nvila_export[0])
    with pytest.raises(MediaError, match=r"\[num_tiles, 3, 448, 448\]"):
        graphs.run_tower(np.zeros((2, 3, 224, 224), np.float32))
    with pytest.raises(MediaError, match=r"\[num_tiles, 3, 448, 448\]"):
        onnx_model.encode_images(torch.zeros(1, 1, 448, 448), [None])
    with pytest.raises(MediaError, match="needs 14 tiles"):
        graphs.run_s2(np.zeros((10, 1024, 64), np.float32), (3, 3))
    with pytest.raises(MediaError, match="rows >= 1"):
        graphs.run_s2(np.zeros((5, 1024, 64), np.float32), (0, 3))


def test_tower_batches_above_max_tiles_run_in_chunks(nvila_export, tiny_model):
    graphs = OnnxVisionGraphs(nvila_export[0])
    graphs.max_tiles = 2
    tiles = torch.randn(5, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert rel_err(tiny_model.get_vision_tower()(tiles), graphs.run_tower(tiles.numpy())) <= FP32_REL


def test_verification_failure_leaves_no_output(tiny_nvila_lite, tmp_path, monkeypatch):
    from nvila_quant.export import verify

    monkeypatch.setitem(verify.TOLERANCES, "fp32", verify.Tolerance(rel=0.0, cosine=1.1))
    with pytest.raises(VerificationError, match="past the fp32 tolerance"):
        export_onnx(tiny_nvila_lite, tmp_path / "out", ExportOptions(verify_images=[_photo("cat")]), progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def _photo(name: str) -> str:
    from nvila_quant.paths import builtin_calib_dir

    return str(builtin_calib_dir() / f"{name}.jpg")


def test_export_refuses_existing_output_and_bad_options(tiny_nvila_lite, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_onnx(tiny_nvila_lite, tmp_path / "out", ExportOptions(verify=False), progress=False)
    with pytest.raises(ConfigError, match="opset"):
        ExportOptions(opset=9)
    with pytest.raises(ConfigError, match="dtype"):
        ExportOptions(dtype="int8")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_vision_source(tmp_path / "missing")


# ---------------------------------------------------------------------------- export/ recipes
def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"export_{name}", REPO / "export" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.inference_mode()
def test_run_onnxruntime_recipe_matches_runtime(nvila_export, tiny_model, images):
    script = _load_script("run_onnxruntime")
    graphs = script.VisionGraphs(nvila_export[0], ["CPUExecutionProvider"])
    for name in ("coffee", "rocket"):
        tiles, block = script.tile_image(images[name], graphs.manifest)
        pixels = script.normalize(tiles, graphs.manifest)
        ref_tiles, ref_blocks, ref = _encode_torch(tiny_model, [images[name], "x"])
        assert block == tuple(ref_blocks[0]) and np.abs(pixels - ref_tiles.numpy()).max() < 1e-5
        assert rel_err(ref[0], graphs.encode(pixels, block)) <= FP32_REL


def test_build_tensorrt_recipe_commands(nvila_export):
    script = _load_script("build_tensorrt")
    cmds = script.commands(nvila_export[0], fp16=True, trtexec="trtexec")
    tower, s2, projector = (" ".join(c) for c in cmds)
    assert "--minShapes=pixel_values:1x3x448x448" in tower and "--maxShapes=pixel_values:17x3x448x448" in tower
    assert "--fp16" in tower
    assert "features_1344:1x1x1024x64" in s2 and "features_1344:12x12x1024x64" in s2
    assert "features_448:1x1024x64" in s2
    assert "--maxShapes=x:17x1024x192" in projector
    assert "ort.onnx" not in tower  # TensorRT builds from the portable graph, never the onnxruntime one
