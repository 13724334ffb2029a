"""Shared fixtures: tiny seeded NVILA checkpoints built once per session with the project's own factory."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from nvila_quant.testing.factory import TinySpec, make_tiny  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDA not available)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default suite is the CPU suite (what CI runs): on a GPU machine, tests not marked ``cuda`` still see no
    GPU, so device defaults ("auto": the GPU when present) and exact comparisons do not change with the hardware.
    GPU behaviour is what the ``cuda`` tests check."""
    if request.node.get_closest_marker("cuda") is None and torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session")
def tiny_nvila(tmp_path_factory: pytest.TempPathFactory):
    """Tiny NVILA (dynamic S2, 2x2 projector) with planted outliers, bf16 on disk."""
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "nvila-tiny", TinySpec(variant="nvila", seed=0))


@pytest.fixture(scope="session")
def tiny_nvila_lite(tmp_path_factory: pytest.TempPathFactory):
    """Tiny NVILA-Lite (dynamic tiling + thumbnail, 3x3 projector) with planted outliers."""
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "nvila-lite-tiny", TinySpec(variant="nvila-lite", seed=1))


@pytest.fixture(scope="session")
def tiny_model(tiny_nvila):
    """The tiny NVILA loaded in fp32 on CPU (shared: do not modify its weights)."""
    from nvila_quant.model import NVILAQwen2

    return NVILAQwen2.load_pretrained(tiny_nvila, torch_dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def images():
    """Built-in photos of different aspect ratios (PIL, RGB)."""
    from nvila_quant.model.media import load_image
    from nvila_quant.paths import builtin_calib_dir

    root = builtin_calib_dir()
    return {name: load_image(root / f"{name}.jpg") for name in ("astronaut", "cat", "coffee", "rocket")}


@pytest.fixture(scope="session")
def tiny_nvila_hf(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_nvila``'s weights in the flat -hf layout (made by the factory, as NVIDIA's -hf repositories are)."""
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "nvila-tiny-hf", TinySpec(variant="nvila", seed=0), layout="hf")


@pytest.fixture(scope="session")
def tiny_nvila_lite_hf(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_nvila_lite``'s weights in the flat -hf layout."""
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "nvila-lite-tiny-hf", TinySpec(variant="nvila-lite", seed=1),
                     layout="hf")
