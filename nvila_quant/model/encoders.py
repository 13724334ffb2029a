"""Media encoders (VILA's ``llava.model.encoders``): run after the projector, add separator tokens.

- ``BasicImageEncoder``: one feature block per image, followed by the embedding of ``end_tokens`` ("\\n").
- ``BasicVideoEncoder``: every frame's block followed by ``end_tokens``, frames concatenated.
- ``TSPVideoEncoder``: temporal/spatial pooling (``pool_sizes``) of the frame features, then as Basic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nvila_quant.errors import ConfigError

if TYPE_CHECKING:
    from nvila_quant.model.llava_arch import LlavaMetaModel

__all__ = ["BasicImageEncoder", "BasicVideoEncoder", "TSPVideoEncoder", "build_encoder", "pool"]


class BaseEncoder(nn.Module):
    """Holds the parent model and the separator strings embedded around each media block."""

    def __init__(self, parent: LlavaMetaModel, start_tokens: str | None = None, end_tokens: str | None = "\n") -> None:
        super().__init__()
        self._parent = [parent]  # a list so the parent is not registered as a sub-module
        self.start_tokens = start_tokens
        self.end_tokens = end_tokens

    @property
    def parent(self) -> LlavaMetaModel:
        return self._parent[0]

    def embed_tokens(self, tokens: str | None) -> torch.Tensor | None:
        """(T, H) embeddings of a short string (no special tokens added), or None."""
        if tokens is None:
            return None
        ids = self.parent.tokenizer(tokens, add_special_tokens=False).input_ids
        embed = self.parent.get_llm().get_input_embeddings()
        return embed(torch.tensor(ids, device=embed.weight.device))


class BasicImageEncoder(BaseEncoder):
    @staticmethod
    def _process_features(
        features: torch.Tensor, start: torch.Tensor | None, end: torch.Tensor | None
    ) -> torch.Tensor:  # (N, H) -> (S + N + E, H)
        if start is not None:
            features = torch.cat([start.to(features.dtype), features], dim=0)
        if end is not None:
            features = torch.cat([features, end.to(features.dtype)], dim=0)
        return features

    def forward(self, images: list[torch.Tensor], config: dict[str, Any]) -> list[torch.Tensor]:
        """images: list of (3, S, S) tiles -> one (N_i + 1, H) embedding block per image."""
        features = self.parent.encode_images(torch.stack(images, dim=0), block_sizes=config.get("block_sizes"))
        start, end = self.embed_tokens(self.start_tokens), self.embed_tokens(self.end_tokens)
        return [self._process_features(f, start, end) for f in features]


class BasicVideoEncoder(BaseEncoder):
    @staticmethod
    def _process_features(
        features: torch.Tensor, start: torch.Tensor | None, end: torch.Tensor | None
    ) -> torch.Tensor:  # (F, N, H) -> (F * (S + N + E), H)
        if start is not None:
            features = torch.cat([start.to(features.dtype).expand(features.shape[0], -1, -1), features], dim=1)
        if end is not None:
            features = torch.cat([features, end.to(features.dtype).expand(features.shape[0], -1, -1)], dim=1)
        return features.flatten(0, 1)

    def _encode(self, videos: list[torch.Tensor]) -> list[torch.Tensor]:
        num_frames = [v.shape[0] for v in videos]
        features = self.parent.encode_images(torch.cat(videos, dim=0))  # (sum F, N, H)
        if isinstance(features, list):
            features = torch.stack(features, dim=0)
        return list(torch.split(features, num_frames))

    def forward(self, videos: list[torch.Tensor], config: dict[str, Any]) -> list[torch.Tensor]:
        """videos: list of (F, 3, S, S) frame stacks -> one (F * (N + 1), H) block per video."""
        start, end = self.embed_tokens(self.start_tokens), self.embed_tokens(self.end_tokens)
        return [self._process_features(f, start, end) for f in self._encode(videos)]


def pool(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Average non-overlapping windows of ``size`` along ``dim``; a short last window is averaged as is."""
    if size == 1:
        return x
    return torch.cat([c.mean(dim=dim, keepdim=True) for c in torch.split(x, size, dim=dim)], dim=dim)


class TSPVideoEncoder(BasicVideoEncoder):
    """Temporal-spatial pooling: for each (t, h, w) in ``pool_sizes`` pool the (F, s, s, H) frame grid."""

    def __init__(
        self,
        parent: LlavaMetaModel,
        pool_sizes: list[list[int]],
        start_tokens: str | None = None,
        end_tokens: str | None = "\n",
        sep_tokens: str | None = None,
    ) -> None:
        super().__init__(parent, start_tokens=start_tokens, end_tokens=end_tokens)
        if not pool_sizes or any(len(p) != 3 or min(p) < 1 for p in pool_sizes):
            raise ConfigError(f"TSPVideoEncoder pool_sizes must be a list of [t, h, w] >= 1, got {pool_sizes}")
        self.pool_sizes = [tuple(int(v) for v in p) for p in pool_sizes]
        self.sep_tokens = sep_tokens

    def forward(self, videos: list[torch.Tensor], config: dict[str, Any]) -> list[torch.Tensor]:
        start, end = self.embed_tokens(self.start_tokens), self.embed_tokens(self.end_tokens)
        sep = self.embed_tokens(self.sep_tokens)
        outputs = []
        for inputs in self._encode(videos):  # (F, s*s, H)
            nt, ns = inputs.shape[:2]
            nl = int(ns**0.5)
            blocks = []
            for pool_size in self.pool_sizes:
                features = inputs.view(nt, nl, nl, -1)
                for dim, p in enumerate(pool_size):
                    features = pool(features, p, dim=dim)
                features = self._process_features(features.flatten(1, 2), start, end)
                if sep is not None:
                    features = torch.cat([features, sep.to(features.dtype)], dim=0)
                blocks.append(features)
            outputs.append(torch.cat(blocks, dim=0))
        return outputs


_ENCODERS = {c.__name__: c for c in (BasicImageEncoder, BasicVideoEncoder, TSPVideoEncoder)}


def build_encoder(spec: dict[str, Any], parent: LlavaMetaModel) -> BaseEncoder:
    """Instantiate ``{"_target_": "llava.model.encoders.TSPVideoEncoder", **kwargs}`` without importing llava."""
    spec = dict(spec)
    target = str(spec.pop("_target_"))
    name = target.rsplit(".", 1)[-1]
    if name not in _ENCODERS:
        raise ConfigError(f"unknown media encoder {target!r}; supported: {', '.join(_ENCODERS)}")
    try:
        return _ENCODERS[name](parent, **spec)
    except TypeError as e:
        raise ConfigError(f"bad arguments for {name}: {spec} ({e})") from e
