"""The top-level NVILA config (root ``config.json``): parsing, validation, where each sub-model's files are.

Two layouts are read:

- three folders (VILA's ``save_pretrained``): the root config is VILA's ``LlavaConfig`` (``model_type:
  "llava_llama"``) next to ``llm/``, ``vision_tower/`` and ``mm_projector/``. Fields the runtime uses are typed;
  every other key is kept in ``extra`` and written back unchanged, so load -> save round-trips.
- flat "-hf" (``model_type`` ``nvila`` / ``nvila_lite``, or ``vila`` on the NVILA-Lite repos): one config with
  ``text_config`` (Qwen2) and ``vision_config`` (SigLIP), weights prefixed ``llm.`` / ``vision_tower.`` /
  ``mm_projector.`` in one set of shards, tokenizer at the root. That config carries no geometry (S2 scales,
  downsample, feature layer): it comes from the model type, as the serving engines hard-code it, unless the config
  names it with the keys of this class (the -hf checkpoints this package writes do).

:meth:`NVILAConfig.part` gives the files of a sub-model (:class:`~nvila_quant.io.Part`) in either layout.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from nvila_quant.errors import CheckpointError, ConfigError
from nvila_quant.io import INDEX_NAME, Part, read_json, safetensors_key_map

__all__ = [
    "GEOMETRY_KEYS",
    "HF_MODEL_TYPES",
    "IMAGE_ASPECT_RATIOS",
    "LAYOUTS",
    "PROJECTOR_TYPES",
    "SUBMODELS",
    "NVILAConfig",
    "dtype_from_str",
    "detect_layout",
    "dtype_to_str",
    "load_config",
    "stock_geometry_differences",
]

SUBMODELS = ("llm", "vision_tower", "mm_projector")
LAYOUTS = ("vila", "hf")  # three folders | flat "-hf"
HF_MODEL_TYPES = ("nvila", "nvila_lite", "vila")
HF_PREFIXES = {"llm": "llm.", "vision_tower": "vision_tower.", "mm_projector": "mm_projector."}
HF_ARCHITECTURES = {"nvila": "NVILAForConditionalGeneration", "nvila_lite": "NVILALiteForConditionalGeneration"}
# NVILAConfig fields an -hf config.json may carry (ours do); absent ones take the model type's stock values
GEOMETRY_KEYS = (
    "mm_projector_type", "image_aspect_ratio", "s2_scales", "s2_max_split_size", "s2_resize_output_to_scale_idx",
    "mm_vision_select_layer", "mm_vision_select_feature", "min_tiles", "max_tiles", "video_max_tiles",
    "num_video_frames", "fps", "image_encoder", "video_encoder", "chat_template",
)
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


_NOT_KEYS = {"extra", "root", "layout", "hf_config"}


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
    layout: str = field(default="vila", compare=False)  # "vila" (three folders) or "hf" (flat); not a config key
    hf_config: dict | None = field(default=None, compare=False)  # the -hf root config.json as read

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

    @property
    def variant(self) -> str:
        """"nvila" (dynamic S2, 2x2 downsample) or "nvila_lite" (dynamic tiling, 3x3 downsample)."""
        return "nvila" if self.is_dynamic_s2 else "nvila_lite"

    def part(self, name: str) -> Part:
        """The files of sub-model ``name`` ("llm", "vision_tower", "mm_projector") in this checkpoint's layout."""
        if name not in SUBMODELS:
            raise ValueError(f"sub-model must be one of {SUBMODELS}, got {name!r}")
        if self.layout == "vila":
            return Part(self.subfolder(name), name=name)
        if self.root is None:
            raise ConfigError("config has no root folder; load it with NVILAConfig.from_pretrained(path)")
        sub = copy.deepcopy(getattr(self, f"{name}_cfg"))
        if name == "llm":  # the flat checkpoint's quantization applies to its LLM (the only quantized part)
            for key in ("quantization_config", "compression_config", "nvila_quant"):
                if (self.hf_config or {}).get(key):
                    sub[key] = copy.deepcopy(self.hf_config[key])
        return Part(self.root, HF_PREFIXES[name], sub, name=name)

    def weights_fingerprint(self) -> str:
        """A short hash of every weight file's name, size and mtime (what the work folder and result caches key on:
        cheap, and it changes when a file is rewritten)."""
        h = hashlib.sha256()
        for sub in ("llm", "mm_projector", "vision_tower"):
            for f in self.part(sub).weight_files():
                st = f.stat()
                h.update(f"{sub}/{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
        return h.hexdigest()[:16]

    def subfolder(self, name: str, root: str | os.PathLike | None = None) -> Path:
        """The folder of sub-model ``name`` ("llm", "vision_tower", "mm_projector") of a three-folder checkpoint."""
        root = Path(root) if root is not None else self.root
        if root is None:
            raise ConfigError("config has no root folder; load it with NVILAConfig.from_pretrained(path)")
        if self.layout != "vila":
            raise CheckpointError(f"{root} is a flat -hf checkpoint: it has no {name}/ folder (use config.part)")
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
        known = {f.name for f in fields(cls)} - _NOT_KEYS
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
        if detect_layout(data) == "hf":
            return cls.from_hf(data, root)
        return cls.from_dict(data, root=root)

    @classmethod
    def from_hf(cls, data: dict, root: str | os.PathLike) -> NVILAConfig:
        """The config of a flat "-hf" checkpoint, its geometry from the model type where the file is silent."""
        root = Path(root)
        for key in ("text_config", "vision_config"):
            if not isinstance(data.get(key), dict):
                raise CheckpointError(f"{root}/config.json: '{key}' must be a dict (the -hf layout)")
        text = copy.deepcopy(data["text_config"])
        text.setdefault("model_type", "qwen2")
        vision = {**copy.deepcopy(data["vision_config"]), "model_type": "siglip_vision_model"}
        variant = _hf_variant(data, root)
        image_size = int(vision.get("image_size", 448))
        geometry = _stock_geometry(variant, image_size)
        geometry.update({k: copy.deepcopy(data[k]) for k in GEOMETRY_KEYS if k in data})
        projector_type = geometry.pop("mm_projector_type")
        scales = geometry.get("s2_scales") or []
        if isinstance(scales, str):
            scales = [int(s) for s in scales.split(",") if s.strip()]
        dynamic_s2 = geometry["image_aspect_ratio"] == "dynamic_s2"
        vision_hidden = int(vision.get("hidden_size", 0))
        dtype = data.get("dtype") or data.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
        config = cls(
            llm_cfg=text,
            vision_tower_cfg=vision,
            mm_projector_cfg={"mm_projector_type": projector_type, "model_type": "v2l_projector"},
            hidden_size=int(text.get("hidden_size", 0)),
            mm_hidden_size=vision_hidden * (len(scales) if dynamic_s2 else 1),
            dynamic_s2=dynamic_s2,
            model_dtype=f"torch.{str(dtype or 'bfloat16').removeprefix('torch.')}",
            root=root,
            layout="hf",
            hf_config=copy.deepcopy(data),
            **geometry,
        )
        return config

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in _NOT_KEYS:
                continue
            out[f.name] = copy.deepcopy(getattr(self, f.name))
        out["s2_scales"] = ",".join(str(s) for s in self.s2_scales)  # VILA stores a string
        out.update(copy.deepcopy(self.extra))
        return out

    def save(self, folder: str | os.PathLike) -> None:
        Path(folder, "config.json").write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")


def detect_layout(data: dict, where: str | os.PathLike = "config.json") -> str:
    """"vila" or "hf" from a root config.json's keys; CheckpointError naming the keys looked for otherwise."""
    if all(k in data for k in ("llm_cfg", "vision_tower_cfg", "mm_projector_cfg")):
        return "vila"
    if "text_config" in data and "vision_config" in data:
        model_type = data.get("model_type")
        archs = data.get("architectures") or []
        if model_type in HF_MODEL_TYPES or any(a in HF_ARCHITECTURES.values() for a in archs):
            return "hf"
        raise CheckpointError(
            f"{where} has text_config + vision_config but model_type {model_type!r} and architectures {archs}; "
            f"an NVILA -hf checkpoint has model_type in {list(HF_MODEL_TYPES)}"
        )
    missing = [k for k in ("llm_cfg", "vision_tower_cfg", "mm_projector_cfg") if k not in data]
    raise CheckpointError(
        f"cannot recognise the NVILA checkpoint layout of {where}: it lacks {missing} (the three-folder layout: "
        "llm/, vision_tower/, mm_projector/) and 'text_config' + 'vision_config' (the flat -hf layout, "
        f"model_type in {list(HF_MODEL_TYPES)}); model_type is {data.get('model_type')!r}"
    )


def _hf_variant(data: dict, root: Path) -> str:
    """"nvila" or "nvila_lite" of an -hf config: model type, then architectures, then the projector's tensors."""
    if data.get("model_type") in HF_ARCHITECTURES:
        return data["model_type"]
    archs = data.get("architectures") or []
    for variant, arch in HF_ARCHITECTURES.items():
        if arch in archs:
            return variant
    if data.get("image_aspect_ratio") in ("dynamic_s2", "dynamic"):
        return "nvila" if data["image_aspect_ratio"] == "dynamic_s2" else "nvila_lite"
    try:  # the Lite projector has layers 1, 2, 4, 5, 7; NVILA's 1, 2, 4
        keys = set(safetensors_key_map(root, validate=False, prefix="mm_projector."))
    except CheckpointError:
        keys = set()
    if "layers.7.weight" in keys:
        return "nvila_lite"
    if "layers.4.weight" in keys:
        return "nvila"
    raise CheckpointError(
        f"{root}/config.json (model_type {data.get('model_type')!r}) does not say whether it is NVILA or NVILA-Lite: "
        f"no architectures {list(HF_ARCHITECTURES.values())} and no mm_projector.layers.* tensors in "
        f"{INDEX_NAME} / the shards"
    )


def _stock_geometry(variant: str, image_size: int) -> dict[str, Any]:
    """What SGLang hard-codes for each -hf model type (the S2 scales as multiples of the tower's tile size)."""
    common = {"mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch", "min_tiles": 1,
              "max_tiles": 12, "video_max_tiles": 1, "num_video_frames": 8, "s2_max_split_size": image_size}
    if variant == "nvila":
        return {**common, "mm_projector_type": "mlp_downsample_2x2_fix", "image_aspect_ratio": "dynamic_s2",
                "s2_scales": [image_size, 2 * image_size, 3 * image_size], "s2_resize_output_to_scale_idx": -1}
    return {**common, "mm_projector_type": "mlp_downsample_3x3_fix", "image_aspect_ratio": "dynamic"}


def stock_geometry_differences(config: NVILAConfig) -> list[str]:
    """Where ``config`` departs from the geometry the serving engines hard-code for its variant (empty = stock)."""
    stock = _stock_geometry(config.variant, 448)
    stock["mm_hidden_size"] = 1152 * (3 if config.variant == "nvila" else 1)
    stock["mm_projector_type"] = {stock["mm_projector_type"]} | (
        {"mlp_downsample"} if config.variant == "nvila" else set())
    out = []
    for key, want in stock.items():
        if key in ("min_tiles", "max_tiles", "video_max_tiles", "num_video_frames", "s2_max_split_size"):
            continue  # processor settings, carried by the checkpoint's own processor
        got = (config.mm_projector_cfg or {}).get(key) if key == "mm_projector_type" else getattr(config, key)
        if key == "s2_resize_output_to_scale_idx":
            got, want = got % len(config.s2_scales), len(config.s2_scales) - 1
        if (got not in want) if isinstance(want, set) else (got != want):
            out.append(f"{key} {got!r} (stock {sorted(want) if isinstance(want, set) else want!r})")
    return out


def load_config(path_or_config: str | os.PathLike | NVILAConfig) -> NVILAConfig:
    if isinstance(path_or_config, NVILAConfig):
        return path_or_config
    return NVILAConfig.from_pretrained(path_or_config)
