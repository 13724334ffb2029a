"""The top-level NVILA config (root ``config.json``): parsing, validation, sub-folder resolution.

The root config is VILA's ``LlavaConfig`` (``model_type: "llava_llama"``). Fields the runtime uses are
typed; every other key is kept in ``extra`` and written back unchanged, so load -> save round-trips.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from nvila_quant.errors import CheckpointError, ConfigError
from nvila_quant.io import read_json

__all__ = [
    "IMAGE_ASPECT_RATIOS",
    "PROJECTOR_TYPES",
    "SUBMODELS",
    "NVILAConfig",
    "dtype_from_str",
    "dtype_to_str",
    "load_config",
]

SUBMODELS = ("llm", "vision_tower", "mm_projector")
IMAGE_ASPECT_RATIOS = ("dynamic_s2", "dynamic", "resize", "pad")
PROJECTOR_TYPES = (
    "identity",
    "linear",
    "mlp_downsample",
    "mlp_downsample_2x2_fix",
    "mlp_downsample_3x3_fix",
    "mlpNx_gelu (N >= 1)",
)
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def dtype_from_str(name: str | torch.dtype | None, default: torch.dtype = torch.bfloat16) -> torch.dtype:
    """``"torch.bfloat16"`` / ``"bf16"`` / ``torch.float16`` -> torch dtype."""
    if name is None:
        return default
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; expected one of fp32, fp16, bf16")
    return _DTYPES[key]


def dtype_to_str(dtype: torch.dtype) -> str:
    return str(dtype)  # "torch.bfloat16", the form VILA writes in model_dtype


def _default_image_encoder() -> dict:
    return {"_target_": "llava.model.encoders.BasicImageEncoder"}


def _default_video_encoder() -> dict:
    return {"_target_": "llava.model.encoders.BasicVideoEncoder"}


@dataclass
class NVILAConfig:
    """Root NVILA config. Field names are the keys of ``config.json``.

    Args:
        llm_cfg / vision_tower_cfg / mm_projector_cfg: sub-configs as embedded in the root config.
        hidden_size: LLM hidden size (the projector's output width).
        mm_hidden_size: projector input width (vision hidden x number of S2 scales for dynamic_s2).
        image_aspect_ratio: "dynamic_s2" (NVILA), "dynamic" (NVILA-Lite tiling + thumbnail), "resize".
        s2_scales: ascending S2 scales in pixels; each a multiple of the first (448,896,1344 on NVILA).
        s2_resize_output_to_scale_idx: scale whose map size all scales are resized to (-1 = largest).
        mm_vision_select_layer: hidden-state index used as the vision feature (-2 on NVILA).
        num_video_frames: frames sampled uniformly from a video.
        image_encoder / video_encoder: ``{"_target_": "...BasicImageEncoder"}`` style dicts (or JSON strings).
    """

    llm_cfg: dict = field(default_factory=dict)
    vision_tower_cfg: dict = field(default_factory=dict)
    mm_projector_cfg: dict = field(default_factory=dict)
    architectures: list[str] = field(default_factory=lambda: ["LlavaLlamaModel"])
    model_type: str = "llava_llama"
    hidden_size: int = 0
    mm_hidden_size: int = 0
    image_aspect_ratio: str = "dynamic_s2"
    dynamic_s2: bool = False
    s2: bool = False
    s2_scales: list[int] = field(default_factory=lambda: [448, 896, 1344])
    s2_max_split_size: int = 448
    s2_resize_output_to_scale_idx: int = 0
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "cls_patch"
    num_video_frames: int = 8
    fps: float = 0.0
    model_dtype: str = "torch.bfloat16"
    chat_template: str | None = None
    min_tiles: int = 1
    max_tiles: int = 12
    video_max_tiles: int = 1
    image_encoder: dict = field(default_factory=_default_image_encoder)
    video_encoder: dict = field(default_factory=_default_video_encoder)
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = True
    extra: dict = field(default_factory=dict)  # every other key of config.json, written back as is
    root: Path | None = field(default=None, compare=False)  # folder the config was read from

    def __post_init__(self) -> None:
        if isinstance(self.s2_scales, str):
            self.s2_scales = [int(s) for s in self.s2_scales.split(",") if s.strip()]
        self.s2_scales = sorted(int(s) for s in self.s2_scales)
        for name in ("image_encoder", "video_encoder"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"config field {name!r} is not valid JSON: {value!r}") from e
            if not isinstance(value, dict) or "_target_" not in value:
                raise ConfigError(f"config field {name!r} must be a dict with '_target_', got {value!r}")
            setattr(self, name, value)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        if self.image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ConfigError(
                f"config field 'image_aspect_ratio' is {self.image_aspect_ratio!r}; "
                f"expected one of {', '.join(IMAGE_ASPECT_RATIOS)}"
            )
        if self.dynamic_s2 and self.image_aspect_ratio != "dynamic_s2":
            raise ConfigError(
                f"config has dynamic_s2=true but image_aspect_ratio={self.image_aspect_ratio!r}; "
                "NVILA checkpoints set image_aspect_ratio='dynamic_s2'"
            )
        if self.image_aspect_ratio == "dynamic_s2":
            if not self.s2_scales:
                raise ConfigError("config field 's2_scales' is empty; NVILA uses '448,896,1344'")
            base = self.s2_scales[0]
            bad = [s for s in self.s2_scales if s % base]
            if bad:
                raise ConfigError(f"s2_scales must be multiples of the first scale {base} (got {self.s2_scales})")
            n = len(self.s2_scales)
            if not -n <= self.s2_resize_output_to_scale_idx < n:
                raise ConfigError(
                    f"s2_resize_output_to_scale_idx={self.s2_resize_output_to_scale_idx} is out of range "
                    f"for {n} scales"
                )
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ConfigError(f"need 1 <= min_tiles <= max_tiles (got {self.min_tiles}, {self.max_tiles})")
        if self.num_video_frames < 1:
            raise ConfigError(f"num_video_frames must be >= 1 (got {self.num_video_frames})")
        if self.mm_vision_select_feature not in ("cls_patch", "patch"):
            raise ConfigError(
                f"mm_vision_select_feature must be 'cls_patch' or 'patch' (got {self.mm_vision_select_feature!r})"
            )

    # ------------------------------------------------------------------ derived values
    @property
    def is_dynamic_s2(self) -> bool:
        return self.image_aspect_ratio == "dynamic_s2"

    @property
    def dtype(self) -> torch.dtype:
        return dtype_from_str(self.model_dtype)

    @property
    def resize_output_to_scale_idx(self) -> int:
        return self.s2_resize_output_to_scale_idx % len(self.s2_scales)

    def subfolder(self, name: str, root: str | os.PathLike | None = None) -> Path:
        """The folder of sub-model ``name`` ("llm", "vision_tower", "mm_projector")."""
        root = Path(root) if root is not None else self.root
        if root is None:
            raise ConfigError("config has no root folder; load it with NVILAConfig.from_pretrained(path)")
        path = root / name
        if path.is_dir():
            return path
        sub = getattr(self, f"{name}_cfg") or {}
        alt = sub.get("_name_or_path") if isinstance(sub, dict) else None
        if alt and (root / Path(alt).name).is_dir():
            return root / Path(alt).name
        raise CheckpointError(
            f"missing sub-folder {name}/ in {root} (config key '{name}_cfg'); an NVILA checkpoint has "
            f"{', '.join(s + '/' for s in SUBMODELS)} next to config.json"
        )

    # ------------------------------------------------------------------ (de)serialization
    @classmethod
    def from_dict(cls, data: dict, root: str | os.PathLike | None = None) -> NVILAConfig:
        data = copy.deepcopy(data)
        known = {f.name for f in fields(cls)} - {"extra", "root"}
        kwargs = {k: data.pop(k) for k in list(data) if k in known}
        for key in ("image_encoder", "video_encoder"):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        for key in ("s2_resize_output_to_scale_idx", "min_tiles", "max_tiles", "video_max_tiles"):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        return cls(**kwargs, extra=data, root=Path(root) if root is not None else None)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> NVILAConfig:
        """Read ``path/config.json`` of a three-folder NVILA checkpoint."""
        root = Path(path)
        if not root.exists():
            raise CheckpointError(f"model folder {root} does not exist")
        if not root.is_dir():
            raise CheckpointError(f"model path {root} is not a folder")
        data = read_json(root / "config.json")
        model_type = data.get("model_type")
        if model_type in ("nvila", "nvila_lite", "vila") and "text_config" in data:
            raise CheckpointError(
                f"{root}/config.json is the flat '-hf' layout (model_type {model_type!r}); load the original "
                "three-folder NVILA checkpoint (llm/, vision_tower/, mm_projector/) instead"
            )
        for key in ("llm_cfg", "vision_tower_cfg", "mm_projector_cfg"):
            if key not in data:
                raise CheckpointError(
                    f"{root}/config.json lacks '{key}': not an NVILA (llava_llama) checkpoint config"
                )
        return cls.from_dict(data, root=root)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("extra", "root"):
                continue
            out[f.name] = copy.deepcopy(getattr(self, f.name))
        out["s2_scales"] = ",".join(str(s) for s in self.s2_scales)  # VILA stores a string
        out.update(copy.deepcopy(self.extra))
        return out

    def save(self, folder: str | os.PathLike) -> None:
        Path(folder, "config.json").write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")


def load_config(path_or_config: str | os.PathLike | NVILAConfig) -> NVILAConfig:
    if isinstance(path_or_config, NVILAConfig):
        return path_or_config
    return NVILAConfig.from_pretrained(path_or_config)
