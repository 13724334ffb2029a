"""NVILA's multimodal projector (``mm_projector/``): downsample blocks + MLP.

Modules live in ``self.layers`` so state-dict keys are ``layers.<i>.weight`` exactly as in
``mm_projector/model.safetensors`` (``layers.weight`` for the single-Linear ``linear`` type).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from nvila_quant.errors import ConfigError
from nvila_quant.model.config import PROJECTOR_TYPES

__all__ = [
    "DownSampleBlock",
    "MultimodalProjector",
    "ScaledActivation",
    "downsample_tokens",
    "projector_downsample_factor",
    "projector_layers",
    "wrap_scaled_activations",
]


def downsample_tokens(x: torch.Tensor, k: int) -> torch.Tensor:
    """Fold each k x k neighbourhood of a square token grid into the channel dim.

    x: (B, N, C) with N = s*s  ->  (B, ceil(s/k)^2, k*k*C). The grid is zero-padded bottom/right to a
    multiple of k; channels are ordered (row offset, column offset, channel), i.e. the result equals
    ``rearrange(x, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)")`` on the padded grid.
    """
    b, n, c = x.shape
    s = math.isqrt(n)
    if s * s != n:
        raise ValueError(f"downsample needs a square token grid, got {n} tokens")
    x = x.reshape(b, s, s, c)
    pad = (-s) % k
    if pad:
        x = F.pad(x, (0, 0, 0, pad, 0, pad))  # (B, s+pad, s+pad, C), zeros bottom/right
    return rearrange(x, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=k, p2=k)


class DownSampleBlock(nn.Module):
    """k x k token downsample (k=2: ``mlp_downsample*``, k=3: ``mlp_downsample_3x3_fix``). No weights."""

    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, N/k^2, k^2*C)
        return downsample_tokens(x, self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}"


def projector_downsample_factor(projector_type: str) -> int:
    """k of the k x k token downsample (1 when the projector keeps every token)."""
    if projector_type == "mlp_downsample_3x3_fix":
        return 3
    if projector_type.startswith("mlp_downsample"):
        return 2
    return 1


def projector_layers(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """The ``layers`` module of each projector type (indices match the checkpoint keys)."""
    c, h = mm_hidden_size, hidden_size
    if projector_type == "identity":
        if c != h:
            raise ConfigError(f"identity projector needs mm_hidden_size == hidden_size (got {c} and {h})")
        return nn.Identity()
    if projector_type == "linear":
        return nn.Linear(c, h)
    if projector_type in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        return nn.Sequential(
            DownSampleBlock(2),  # 0
            nn.LayerNorm(4 * c),  # 1
            nn.Linear(4 * c, h),  # 2
            nn.GELU(),  # 3
            nn.Linear(h, h),  # 4
        )
    if projector_type == "mlp_downsample_3x3_fix":
        return nn.Sequential(
            DownSampleBlock(3),  # 0
            nn.LayerNorm(9 * c),  # 1
            nn.Linear(9 * c, 3 * c),  # 2
            nn.GELU(),  # 3
            nn.LayerNorm(3 * c),  # 4
            nn.Linear(3 * c, h),  # 5
            nn.GELU(),  # 6
            nn.Linear(h, h),  # 7
        )
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if match and int(match.group(1)) >= 1:
        modules: list[nn.Module] = [nn.Linear(c, h)]
        for _ in range(1, int(match.group(1))):
            modules += [nn.GELU(), nn.Linear(h, h)]
        return nn.Sequential(*modules)
    raise ConfigError(
        f"unknown mm_projector_type {projector_type!r}; supported: {', '.join(PROJECTOR_TYPES)}"
    )


class ScaledActivation(nn.Module):
    """act(x) / scales: holds AWQ scales of an activation -> Linear group (AutoAWQ's module).

    Checkpoint key ``<act>.scales`` (C,); listed in ``mm_projector/config.json`` as ``scaled_activations``.
    """

    def __init__(self, act: nn.Module, channels: int) -> None:
        super().__init__()
        self.act = act
        self.scales = nn.Parameter(torch.ones(channels), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) / self.scales.to(x.dtype)


def wrap_scaled_activations(module: nn.Module, names: Sequence[str]) -> nn.Module:
    """Replace each activation named in ``names`` (e.g. ``layers.3``) with a ScaledActivation (in place).

    The width is the in_features of the Linear that follows it in its nn.Sequential."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        act = parent.get_submodule(child)
        if isinstance(act, ScaledActivation):
            continue
        if not isinstance(parent, nn.Sequential) or not child.isdigit() or int(child) + 1 >= len(parent):
            raise ConfigError(f"scaled activation {name!r} must be followed by a Linear in an nn.Sequential")
        nxt = parent[int(child) + 1]
        ref = next(iter([*parent.parameters(), *parent.buffers()]))
        scaled = ScaledActivation(act, nxt.in_features).to(device=ref.device, dtype=ref.dtype)
        parent[int(child)] = scaled
    return module


class MultimodalProjector(nn.Module):
    """Vision features -> LLM embeddings. (B, N, mm_hidden) -> (B, N/k^2, hidden)."""

    def __init__(
        self, projector_type: str, mm_hidden_size: int, hidden_size: int, scaled_activations: Sequence[str] = ()
    ) -> None:
        super().__init__()
        self.projector_type = projector_type
        self.mm_hidden_size = mm_hidden_size
        self.hidden_size = hidden_size
        self.downsample = projector_downsample_factor(projector_type)
        self.layers = projector_layers(projector_type, mm_hidden_size, hidden_size)
        self.scale_activations(scaled_activations)

    @property
    def scaled_activations(self) -> list[str]:
        """Names of the activations that carry AWQ scales (``layers.3`` style)."""
        return [n for n, m in self.named_modules() if isinstance(m, ScaledActivation)]

    def scale_activations(self, names: Sequence[str]) -> None:
        """Wrap the named activations (``layers.<i>``) in :class:`ScaledActivation` (AWQ's GELU -> Linear)."""
        wrap_scaled_activations(self, list(names))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.mm_hidden_size:
            raise ValueError(
                f"projector expects features of width mm_hidden_size={self.mm_hidden_size}, got {x.shape[-1]}"
            )
        return self.layers(x)

    def config_dict(self) -> dict:
        """The ``mm_projector/config.json`` VILA writes."""
        out = {
            "architectures": ["MultimodalProjector"],
            "mm_projector_type": self.projector_type,
            "model_type": "v2l_projector",
        }
        if self.scaled_activations:
            out["scaled_activations"] = self.scaled_activations
        return out

    @staticmethod
    def num_tokens(projector_type: str, tokens_per_tile: int) -> int:
        """Tokens per tile after the projector's downsample (1024 -> 256 for 2x2, 121 for 3x3)."""
        k = projector_downsample_factor(projector_type)
        side = math.isqrt(tokens_per_tile)
        return math.ceil(side / k) ** 2
