"""The remote code a flat "-hf" NVILA export ships: config and processor classes (``trust_remote_code=True``).

The two files live in ``nvila_quant/data/remote_code/`` and are never imported by this package: they are copied
next to ``config.json``, whose ``auto_map`` (:func:`auto_map`) points at them. :func:`write_remote_code` also writes
``processor_config.json`` (the processor's class and media geometry) and ``preprocessor_config.json`` (SigLIP's).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nvila_quant.errors import ConfigError
from nvila_quant.io import write_json
from nvila_quant.model.config import NVILAConfig

__all__ = [
    "CONFIG_GEOMETRY_KEYS",
    "PROCESSOR_KEYS",
    "REMOTE_CODE_FILES",
    "auto_map",
    "processor_geometry",
    "remote_code_dir",
    "variant_name",
    "write_remote_code",
]

REMOTE_CODE_FILES = ("configuration_nvila.py", "processing_nvila.py")
PROCESSOR_CLASS = "NVILAProcessor"
# processor __init__ arguments (processing_nvila.NVILAProcessor)
PROCESSOR_KEYS = (
    "image_aspect_ratio", "s2_scales", "s2_resize_output_to_scale_idx", "min_tiles", "max_tiles", "image_size",
    "patch_size", "mm_projector_type", "num_video_frames", "image_encoder", "video_encoder",
)
# geometry keys of config.json the processor does not use (accepted by write_remote_code, not written)
CONFIG_GEOMETRY_KEYS = ("mm_vision_select_layer", "mm_vision_select_feature", "chat_template", "s2_max_split_size",
                        "video_max_tiles", "fps")
_CONFIG_CLASSES = {"nvila": "NVILAConfig", "nvila_lite": "NVILALiteConfig"}
_STOCK = {  # processor geometry of each variant where it differs from NVILAProcessor's defaults
    "nvila": {"image_aspect_ratio": "dynamic_s2", "mm_projector_type": "mlp_downsample_2x2_fix"},
    "nvila_lite": {"image_aspect_ratio": "dynamic", "mm_projector_type": "mlp_downsample_3x3_fix"},
}


def remote_code_dir() -> Path:
    """The folder holding ``configuration_nvila.py`` and ``processing_nvila.py`` (package data)."""
    return Path(__file__).resolve().parents[1] / "data" / "remote_code"


def variant_name(variant: str) -> str:
    """``"nvila"`` or ``"nvila_lite"`` (the model_type) from ``nvila`` / ``nvila-lite`` / ``nvila_lite``."""
    name = variant.replace("-", "_").lower()
    if name not in _CONFIG_CLASSES:
        raise ConfigError(f"unknown NVILA variant {variant!r}; expected 'nvila' or 'nvila-lite'")
    return name


def auto_map(variant: str) -> dict[str, str]:
    """``auto_map`` of the -hf ``config.json``: AutoConfig and AutoProcessor classes in the shipped files."""
    return {
        "AutoConfig": f"configuration_nvila.{_CONFIG_CLASSES[variant_name(variant)]}",
        "AutoProcessor": f"processing_nvila.{PROCESSOR_CLASS}",
    }


def processor_geometry(config: NVILAConfig, vision_config: Mapping[str, Any]) -> dict[str, Any]:
    """The processor's media geometry from a runtime config and the SigLIP config (image and patch size)."""
    return {
        "image_aspect_ratio": config.image_aspect_ratio,
        "s2_scales": list(config.s2_scales),
        "s2_resize_output_to_scale_idx": config.s2_resize_output_to_scale_idx,
        "min_tiles": config.min_tiles,
        "max_tiles": config.max_tiles,
        "image_size": int(vision_config["image_size"]),
        "patch_size": int(vision_config["patch_size"]),
        "mm_projector_type": (config.mm_projector_cfg or {}).get("mm_projector_type")
        or _STOCK["nvila_lite" if config.image_aspect_ratio == "dynamic" else "nvila"]["mm_projector_type"],
        "num_video_frames": config.num_video_frames,
        "image_encoder": dict(config.image_encoder),
        "video_encoder": dict(config.video_encoder),
    }


def write_remote_code(
    out: Path, variant: str, image_processor_config: Mapping[str, Any], geometry: Mapping[str, Any] | None = None
) -> None:
    """Copy the remote code into ``out`` and write ``processor_config.json`` and ``preprocessor_config.json``.

    ``image_processor_config``: the SigLIP image processor's config (``vision_tower/preprocessor_config.json``).
    ``geometry``: config.json's geometry keys (:data:`PROCESSOR_KEYS`, plus :data:`CONFIG_GEOMETRY_KEYS`, which
    the processor ignores; see :func:`processor_geometry`); the variant's stock geometry fills what is missing.
    """
    name = variant_name(variant)
    geometry = dict(geometry or {})
    unknown = sorted(set(geometry) - set(PROCESSOR_KEYS) - set(CONFIG_GEOMETRY_KEYS))
    if unknown:
        raise ConfigError(f"unknown processor geometry key(s) {unknown}; expected some of {', '.join(PROCESSOR_KEYS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for filename in REMOTE_CODE_FILES:
        shutil.copyfile(remote_code_dir() / filename, out / filename)
    processor: dict[str, Any] = {"auto_map": {"AutoProcessor": f"processing_nvila.{PROCESSOR_CLASS}"},
                                 "processor_class": PROCESSOR_CLASS}
    processor.update(_STOCK[name])
    processor.update({k: v for k, v in geometry.items() if k in PROCESSOR_KEYS})
    write_json(out / "processor_config.json", processor)
    image_processor = {"image_processor_type": "SiglipImageProcessor", **dict(image_processor_config)}
    image_processor["processor_class"] = PROCESSOR_CLASS
    if processor.get("image_size"):  # the runtime forces the tile size onto SigLIP's processor
        image_processor["size"] = {"height": processor["image_size"], "width": processor["image_size"]}
    write_json(out / "preprocessor_config.json", image_processor)
