"""The projector: downsample blocks equal the reference einops formula; keys match the checkpoint."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

from nvila_quant.errors import ConfigError
from nvila_quant.model.projector import MultimodalProjector, downsample_tokens


def _vila_flat_square(x: torch.Tensor, k: int) -> torch.Tensor:
    """VILA's view/permute implementation (DownSampleBlock / DownSample3x3BlockFix), as an oracle."""
    n, w, h, c = x.size()
    if w % k:
        x = torch.cat([x, torch.zeros((n, k - w % k, h, c), dtype=x.dtype)], dim=1)
        n, w, h, c = x.size()
    if h % k:
        x = torch.cat([x, torch.zeros((n, w, k - h % k, c), dtype=x.dtype)], dim=2)
        n, w, h, c = x.size()
    x = x.contiguous().view(n, w, h // k, c * k).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, h // k, w // k, c * k * k).permute(0, 2, 1, 3).contiguous()
    return x.reshape(n, -1, c * k * k)


@pytest.mark.parametrize(("k", "side"), [(2, 32), (2, 5), (3, 32), (3, 9)])
def test_downsample_equals_einops_formula(k, side):
    x = torch.randn(3, side * side, 7)
    out = downsample_tokens(x, k)
    padded_side = -(-side // k) * k
    grid = torch.zeros(3, padded_side, padded_side, 7)
    grid[:, :side, :side] = x.reshape(3, side, side, 7)
    expected = rearrange(grid, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=k, p2=k)
    assert torch.equal(out, expected)
    assert torch.equal(out, _vila_flat_square(x.reshape(3, side, side, 7), k))


def test_token_counts():
    assert MultimodalProjector.num_tokens("mlp_downsample_2x2_fix", 1024) == 256
    assert MultimodalProjector.num_tokens("mlp_downsample_3x3_fix", 1024) == 121
    assert MultimodalProjector.num_tokens("linear", 1024) == 1024


@pytest.mark.parametrize(
    ("ptype", "keys"),
    [
        ("linear", ["layers.weight", "layers.bias"]),
        ("mlp2x_gelu", ["layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"]),
        ("mlp_downsample", ["layers.1.weight", "layers.1.bias", "layers.2.weight", "layers.2.bias",
                            "layers.4.weight", "layers.4.bias"]),
        ("mlp_downsample_2x2_fix", ["layers.1.weight", "layers.1.bias", "layers.2.weight", "layers.2.bias",
                                    "layers.4.weight", "layers.4.bias"]),
        ("mlp_downsample_3x3_fix", [f"layers.{i}.{p}" for i in (1, 2, 4, 5, 7) for p in ("weight", "bias")]),
    ],
)
def test_state_dict_keys_match_checkpoint(ptype, keys):
    proj = MultimodalProjector(ptype, 12, 16)
    assert sorted(proj.state_dict()) == sorted(keys)
    out = proj(torch.randn(2, 36, 12))
    assert out.shape[-1] == 16


def test_3x3_shapes():
    proj = MultimodalProjector("mlp_downsample_3x3_fix", 12, 16)
    assert proj.layers[2].weight.shape == (36, 108)  # Linear(9C, 3C)
    assert proj.layers[5].weight.shape == (16, 36)  # Linear(3C, H)
    assert proj(torch.randn(1, 1024, 12)).shape == (1, 121, 16)


def test_unknown_projector_type():
    with pytest.raises(ConfigError, match="unknown mm_projector_type 'mlp_magic'"):
        MultimodalProjector("mlp_magic", 8, 8)
