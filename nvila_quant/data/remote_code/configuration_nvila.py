"""Configs of the flat "-hf" NVILA checkpoints (remote code: loaded with ``trust_remote_code=True``).

One ``config.json`` holds ``text_config`` (Qwen2), ``vision_config`` (SigLIP), ``image_token_id`` /
``video_token_id`` (the keys SGLang's ``NVILAForConditionalGeneration`` / ``NVILALiteForConditionalGeneration``
read) and the media geometry, under the names of VILA's root config, so that checkpoints whose geometry differs from
the stock one are described completely. Self-contained: only ``transformers`` is imported.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig, Qwen2Config, SiglipVisionConfig

__all__ = ["NVILAConfig", "NVILALiteConfig"]

_BASIC_IMAGE_ENCODER = {"_target_": "llava.model.encoders.BasicImageEncoder"}
_BASIC_VIDEO_ENCODER = {"_target_": "llava.model.encoders.BasicVideoEncoder"}


def _sub_config(value: Any, cls: type[PretrainedConfig]) -> PretrainedConfig:
    """A sub-config from a dict, a config object or None (the class defaults)."""
    if value is None:
        return cls()
    if isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        return cls(**{k: v for k, v in value.items() if k != "model_type"})
    raise TypeError(f"{cls.__name__} sub-config must be a dict or a {cls.__name__} (got {type(value).__name__})")


class NVILAConfig(PretrainedConfig):
    """NVILA: Qwen2 LLM + SigLIP tower with dynamic S2 (448/896/1344 px) + 2x2-downsample MLP projector.

    Args:
        text_config / vision_config: the Qwen2 and SigLIP configs (dicts or config objects).
        image_token_id / video_token_id: ids of ``<image>`` / ``<vila/video>`` (-1 when unset).
        mm_projector_type: projector layout ("mlp_downsample_2x2_fix" on NVILA).
        image_aspect_ratio: "dynamic_s2" (NVILA) or "dynamic" (NVILA-Lite tiling with a thumbnail).
        s2_scales: ascending S2 scales in pixels, each a multiple of the first.
        s2_resize_output_to_scale_idx: scale whose feature map every scale is resized to (-1 = largest).
        mm_vision_select_layer / mm_vision_select_feature: vision feature = ``hidden_states[layer]``, all patches.
        min_tiles / max_tiles: tile-count bounds of the aspect-ratio grid.
        num_video_frames: frames sampled uniformly from a video.
        image_encoder / video_encoder: VILA encoder specs (``{"_target_": "...BasicImageEncoder"}``).
        chat_template: template name or None (the tokenizer's template).
    """

    model_type = "nvila"
    sub_configs = {"text_config": Qwen2Config, "vision_config": SiglipVisionConfig}
    geometry_defaults = {
        "mm_projector_type": "mlp_downsample_2x2_fix",
        "image_aspect_ratio": "dynamic_s2",
        "s2_scales": [448, 896, 1344],
        "s2_resize_output_to_scale_idx": -1,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "cls_patch",
        "min_tiles": 1,
        "max_tiles": 12,
        "num_video_frames": 8,
        "image_encoder": _BASIC_IMAGE_ENCODER,
        "video_encoder": _BASIC_VIDEO_ENCODER,
    }

    def __init__(
        self,
        text_config: dict | Qwen2Config | None = None,
        vision_config: dict | SiglipVisionConfig | None = None,
        image_token_id: int | None = None,
        video_token_id: int | None = None,
        mm_projector_type: str | None = None,
        image_aspect_ratio: str | None = None,
        s2_scales: list[int] | str | None = None,
        s2_resize_output_to_scale_idx: int | None = None,
        mm_vision_select_layer: int | None = None,
        mm_vision_select_feature: str | None = None,
        min_tiles: int | None = None,
        max_tiles: int | None = None,
        num_video_frames: int | None = None,
        image_encoder: dict | None = None,
        video_encoder: dict | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.text_config = _sub_config(text_config, Qwen2Config)
        self.vision_config = _sub_config(vision_config, SiglipVisionConfig)
        self.image_token_id = -1 if image_token_id is None else int(image_token_id)
        self.video_token_id = -1 if video_token_id is None else int(video_token_id)
        given = {
            "mm_projector_type": mm_projector_type,
            "image_aspect_ratio": image_aspect_ratio,
            "s2_scales": s2_scales,
            "s2_resize_output_to_scale_idx": s2_resize_output_to_scale_idx,
            "mm_vision_select_layer": mm_vision_select_layer,
            "mm_vision_select_feature": mm_vision_select_feature,
            "min_tiles": min_tiles,
            "max_tiles": max_tiles,
            "num_video_frames": num_video_frames,
            "image_encoder": image_encoder,
            "video_encoder": video_encoder,
        }
        for name, value in given.items():
            setattr(self, name, copy.deepcopy(self.geometry_defaults[name] if value is None else value))
        if isinstance(self.s2_scales, str):  # VILA's root config stores "448,896,1344"
            self.s2_scales = [int(s) for s in self.s2_scales.split(",") if s.strip()]
        self.s2_scales = [int(s) for s in self.s2_scales]
        self.chat_template = chat_template
        super().__init__(**kwargs)


class NVILALiteConfig(NVILAConfig):
    """NVILA-Lite: Qwen2 LLM + SigLIP tower with InternVL-style tiles and a thumbnail + 3x3-downsample projector."""

    model_type = "nvila_lite"
    geometry_defaults = {
        **NVILAConfig.geometry_defaults,
        "mm_projector_type": "mlp_downsample_3x3_fix",
        "image_aspect_ratio": "dynamic",
    }

    def __init__(self, **kwargs: Any) -> None:
        # an own __init__: transformers 5 turns config subclasses without one into dataclasses with a generated one
        super().__init__(**kwargs)
