"""Rewriting an NVILA checkpoint in the other layout: three folders <-> flat "-hf". A pure repack.

Either layout is read through :meth:`NVILAConfig.part`; the writers stream tensor by tensor (memory bounded by
one shard). Quantized linears keep their int4 codes: the flat layout carries the LLM's in AutoAWQ GEMM (default)
or compressed-tensors, a tinychat source is repacked bit-exactly. What the flat layout cannot express is refused
before anything is written (:func:`check_flat_quantization`); the engines' own rules are reproduced in
``tests/serving``.

Flat layout written (what SGLang's ``NVILAForConditionalGeneration`` / ``NVILALiteForConditionalGeneration`` load):
    config.json                 model_type nvila | nvila_lite, text_config, vision_config, image/video token ids,
                                our geometry keys, top-level quantization_config (LLM only), auto_map
    model*.safetensors + index  llm.*, vision_tower.vision_model.*, mm_projector.layers.* (projector in float:
                                a quantized one is dequantized, its AWQ activation scales folded into the next Linear)
    tokenizer files             with <image> / <vila/video> exposed as image_token / video_token
    configuration_nvila.py, processing_nvila.py, processor_config.json, preprocessor_config.json (remote code)
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nvila_quant.errors import CheckpointError, ConfigError
from nvila_quant.formats.checkpoint import (
    METADATA_KEY,
    QuantizedCheckpointWriter,
    ShardWriter,
    copy_side_files,
    read_quantized_submodel,
)
from nvila_quant.io import Part, read_json, read_tensors, write_json
from nvila_quant.model.config import HF_ARCHITECTURES, HF_PREFIXES, NVILAConfig
from nvila_quant.model.llm import grow_rows
from nvila_quant.model.quantized import float_projector_state, is_quantized
from nvila_quant.model.remote_code import auto_map, processor_geometry, write_remote_code
from nvila_quant.model.tokenizer import load_tokenizer

__all__ = [
    "FLAT_FORMATS",
    "check_flat_quantization",
    "materialize_part",
    "runtime_tokenizer",
    "save_tokenizer",
    "write_hf",
    "write_side_files",
    "write_vila",
]

logger = logging.getLogger(__name__)

FLAT_FORMATS = ("autoawq", "compressed-tensors")  # what SGLang takes for the LLM of a flat checkpoint
_QUANT_KEYS = ("quantization_config", "compression_config", METADATA_KEY)
_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # stacked into one layer by SGLang / vLLM
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json")
_REMOTE_SIDE_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
_SIGLIP_DEFAULT_PROCESSOR = {
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor", "resample": 3,
    "rescale_factor": 1 / 255,
}


def runtime_tokenizer(config: NVILAConfig):  # noqa: ANN201 (a transformers tokenizer)
    """The tokenizer as the runtime sets it up (sentinel and media tokens added)."""
    llm_cfg = config.part("llm").read_config()
    max_len = llm_cfg.get("model_max_length") or llm_cfg.get("tokenizer_model_max_length")
    return load_tokenizer(config.part("llm").folder, model_max_length=max_len, chat_template=config.chat_template)


def save_tokenizer(tokenizer, out: Path) -> None:  # noqa: ANN001 (a transformers tokenizer)
    """Save the runtime tokenizer with its media tokens named ``image_token`` / ``video_token`` (what SGLang's
    processor reads from the tokenizer; transformers loads a dict ``extra_special_tokens`` as named tokens)."""
    tokenizer.save_pretrained(str(out))
    path = Path(out) / "tokenizer_config.json"
    data = read_json(path)
    named = data.get("extra_special_tokens")
    named = dict(named) if isinstance(named, dict) else {}
    named.update({"image_token": tokenizer.media_tokens["image"], "video_token": tokenizer.media_tokens["video"]})
    data["extra_special_tokens"] = named
    write_json(path, data)


def check_flat_quantization(spec: Any, quantized: list[str], fmt: str) -> None:
    """Refuse LLM quantization a flat -hf checkpoint cannot state for the engines (ConfigError, before writing):
    a format they do not load, group sizes that differ per layer (``quantization_config`` has one), and stacked
    projections (q/k/v, gate/up) that are not all quantized alike."""
    if fmt not in FLAT_FORMATS:
        raise ConfigError(f"the flat -hf layout carries the LLM as {' or '.join(FLAT_FORMATS)} (what SGLang loads), "
                          f"not {fmt}; pass --format autoawq")
    if spec.module_overrides:
        some = dict(list(sorted(spec.module_overrides.items()))[:3])
        raise ConfigError(
            f"layers quantized with another group size than {spec.group_size} ({some}, ...) cannot be stated in "
            "one quantization_config: SGLang and vLLM would read them with the wrong groups. Re-quantize with a "
            "--group-size that fits every layer (e.g. 64 or -1)"
        )
    qset = set(quantized)
    layers = {m.rsplit(".", 2)[0] for m in quantized if m.startswith("model.layers.")}
    for layer in sorted(layers):
        for group in _FUSED:
            sub = "self_attn" if group[0] == "q_proj" else "mlp"
            names = [f"{layer}.{sub}.{p}" for p in group]
            states = {n in qset for n in names}
            if len(states) > 1:
                quant = ", ".join(n for n in names if n in qset)
                flt = ", ".join(n for n in names if n not in qset)
                raise ConfigError(f"{quant} quantized but {flt} float: SGLang and vLLM stack these into one layer, "
                                  "which must be all int4 or all float")


def _image_processor_config(config: NVILAConfig) -> dict:
    vt = config.part("vision_tower")
    path = vt.folder / "preprocessor_config.json"
    data = read_json(path) if path.is_file() else dict(_SIGLIP_DEFAULT_PROCESSOR)
    return {k: v for k, v in data.items() if k not in ("auto_map", "processor_class")}


def _vision_key(key: str) -> str:
    return key if key.startswith("vision_model.") else f"vision_model.{key}"


def _stream(part: Part, writer: ShardWriter, prefix: str, rename=None, transform=None, desc: str = "",  # noqa: ANN001
            progress: bool = True, skip: set[str] | None = None) -> None:
    """Copy every tensor of ``part`` into ``writer`` as ``prefix + rename(key)``, one shard's tensors at a time."""
    key_map = part.key_map()
    keys = [k for k in key_map if k not in (skip or set())]
    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(key_map[k], []).append(k)
    with tqdm(total=len(keys), desc=desc, leave=False, disable=not progress) as bar:
        for names in by_file.values():
            for key, t in read_tensors(key_map, names).items():
                writer.add_tensor(prefix + (rename(key) if rename else key), transform(key, t) if transform else t)
                bar.update()


def write_hf(config: NVILAConfig, out: Path, *, fmt: str | None = None, progress: bool = True,
             carry_from: NVILAConfig | None = None) -> dict:
    """Write ``config``'s checkpoint (either layout, float or quantized) as a flat -hf checkpoint into the empty
    folder ``out`` (the caller makes it atomic). ``fmt``: the LLM's int4 format (default: the source's, tinychat
    -> autoawq). ``carry_from``: the -hf checkpoint whose identity (architectures, model_type, auto_map) and
    remote code the output keeps (default: ``config`` itself when it is -hf; else this package's remote code).
    Returns the manifest (also written as ``nvila_quant_export.json``)."""
    carry = carry_from if carry_from is not None else (config if config.layout == "hf" else None)
    out = Path(out)
    variant = config.variant
    manifest: dict[str, Any] = {"layout": "hf", "variant": variant, "source": str(config.root),
                                "source_layout": config.layout, "notes": []}
    tokenizer = runtime_tokenizer(config)
    rows = len(tokenizer)
    llm, vt, mp = (config.part(n) for n in ("llm", "vision_tower", "mm_projector"))
    llm_cfg = llm.read_config()
    text_config = {k: v for k, v in llm_cfg.items() if k not in _QUANT_KEYS and k != "_name_or_path"}
    text_config["vocab_size"] = max(int(text_config.get("vocab_size") or 0), rows)
    writer: ShardWriter
    qlinears: Any = {}
    spec = None
    if is_quantized(llm):
        floats_keys, qlinears, spec = _quantized_parts(llm)
        target = fmt or (spec.format if spec.format in FLAT_FORMATS else "autoawq")
        check_flat_quantization(spec, list(qlinears), target)
        if target != spec.format:
            manifest["notes"].append(f"LLM int4 codes repacked from {spec.format} to {target} (bit exact)")
        writer = QuantizedCheckpointWriter(out, target, spec.bits, spec.group_size, spec.symmetric,
                                           module_prefix=HF_PREFIXES["llm"])
    else:
        if fmt is not None:
            raise ConfigError(f"--format {fmt} applies to a quantized checkpoint; {config.root} is float")
        floats_keys = None
        writer = ShardWriter(out)
    heads = ("model.embed_tokens.weight", "lm_head.weight")

    def grow(key: str, t: torch.Tensor) -> torch.Tensor:
        return grow_rows(t, text_config["vocab_size"], config.dtype) if key in heads else t

    packed_keys = set(llm.key_map()) - set(floats_keys) if floats_keys is not None else set()
    _stream(llm, writer, HF_PREFIXES["llm"], transform=grow, desc="llm (float)", progress=progress, skip=packed_keys)
    for name in tqdm(list(qlinears), desc="llm (int4)", leave=False, disable=not progress):
        writer.add_linear(HF_PREFIXES["llm"] + name, qlinears[name])
    _stream(vt, writer, HF_PREFIXES["vision_tower"], rename=_vision_key, desc="vision tower", progress=progress)
    # a quantized projector in fp32: the int4 x scale products exactly (the engines cast to their dtype on load)
    projector, _ = float_projector_state(mp, torch.float32 if is_quantized(mp) else config.dtype)
    if is_quantized(mp):
        manifest["notes"].append("mm_projector: int4 linears written dequantized in fp32 (the engines run the "
                                 "projector in float), AWQ activation scales folded into the next Linear")
    for key, t in projector.items():
        writer.add_tensor(HF_PREFIXES["mm_projector"] + key, t)

    vision_config = {k: v for k, v in vt.read_config().items() if k != "_name_or_path"}
    if vision_config.get("model_type") == "siglip":
        vision_config = dict(vision_config.get("vision_config", {}))
    vision_config["model_type"] = "siglip_vision_model"
    geometry = processor_geometry(config, vision_config)
    root: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[variant]],
        "model_type": variant,
        "auto_map": auto_map(variant),
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_id": int(tokenizer.media_token_ids["image"]),
        "video_token_id": int(tokenizer.media_token_ids["video"]),
        "dtype": str(config.dtype).removeprefix("torch."),
        "mm_projector_type": geometry["mm_projector_type"],
        "image_aspect_ratio": config.image_aspect_ratio,
        "s2_scales": list(config.s2_scales) if config.is_dynamic_s2 else [],
        "s2_resize_output_to_scale_idx": config.s2_resize_output_to_scale_idx,
        "mm_vision_select_layer": config.mm_vision_select_layer,
        "mm_vision_select_feature": config.mm_vision_select_feature,
        "min_tiles": config.min_tiles,
        "max_tiles": config.max_tiles,
        "video_max_tiles": config.video_max_tiles,
        "num_video_frames": config.num_video_frames,
        "image_encoder": copy.deepcopy(config.image_encoder),
        "video_encoder": copy.deepcopy(config.video_encoder),
        "chat_template": None,
    }
    source = carry.hf_config if carry is not None else None
    if source:  # an -hf input keeps its identity and its remote code's entry points unchanged
        for key in ("architectures", "model_type", "auto_map"):
            if key in source:
                root[key] = copy.deepcopy(source[key])
    if spec is not None:
        assert isinstance(writer, QuantizedCheckpointWriter)
        llm_linears = [n for n in _llm_linear_names(llm) if n not in qlinears]
        not_convert = ["vision_tower", "mm_projector", *([] if "lm_head" in qlinears else ["lm_head"]),
                       *(HF_PREFIXES["llm"] + n for n in llm_linears if n != "lm_head")]
        root = writer.quantized_config(root, not_convert)
        manifest["quantization"] = {"format": writer.fmt, "bits": spec.bits, "group_size": spec.group_size,
                                    "zero_point": not spec.symmetric, "float_llm_linears": llm_linears}
        writer.finish_shards()
    else:
        writer.finish_shards()
    write_json(out / "config.json", root)
    save_tokenizer(tokenizer, out)
    if (llm.folder / "generation_config.json").is_file():
        shutil.copy2(llm.folder / "generation_config.json", out / "generation_config.json")
    if carry is not None:  # carried over unchanged: the checkpoint's own remote code and processor files
        for f in sorted(carry.root.iterdir()):
            if f.is_file() and (f.suffix == ".py" or f.name in _REMOTE_SIDE_FILES):
                shutil.copy2(f, out / f.name)
        manifest["notes"].append("remote code and processor files carried over from the -hf input")
    else:
        write_remote_code(out, variant, _image_processor_config(config), geometry)
    manifest["files"] = sorted(p.name for p in out.iterdir())
    write_json(out / "nvila_quant_export.json", manifest)
    return manifest


def _quantized_parts(part: Part) -> tuple[list[str], Any, Any]:
    floats, qlinears, spec = read_quantized_submodel(part, lazy=True)
    return list(floats), qlinears, spec


def _llm_linear_names(part: Part) -> list[str]:
    """Module names of the LLM's Linear layers from its tensor names (``.weight`` of 2-D linears, or packed)."""
    names = set()
    for key in part.key_map(validate=False):
        mod, _, suffix = key.rpartition(".")
        if mod.endswith(("_proj", "lm_head")) and suffix in ("weight", "qweight", "weight_packed"):
            names.add(mod)
    return sorted(names)


# ------------------------------------------------------------------------------------------- three folders
def write_side_files(part: Part, dst: Path) -> None:
    """The files beside a sub-model's weights: a folder's (tokenizer, preprocessor, ...) or, from a flat
    checkpoint's root, those of this part (tokenizer + generation config for the LLM, preprocessor for the tower)."""
    if not part.flat:
        copy_side_files(part.folder, dst)
        return
    dst.mkdir(parents=True, exist_ok=True)
    names = {"llm": _TOKENIZER_FILES, "vision_tower": ("preprocessor_config.json",)}.get(part.name, ())
    for name in names:
        if (part.folder / name).is_file():
            shutil.copy2(part.folder / name, dst / name)


def _sub_config(part: Part) -> dict:
    cfg = part.read_config()
    if part.name == "llm":
        cfg.setdefault("architectures", ["Qwen2ForCausalLM"])
    elif part.name == "vision_tower":
        cfg.setdefault("architectures", ["SiglipVisionModel"])
    else:
        cfg.setdefault("architectures", ["MultimodalProjector"])
    return cfg


def materialize_part(part: Part, dst: Path, progress: bool = True) -> None:
    """Write ``part`` as a sub-model folder of the three-folder layout (a copy, or a re-keyed flat part)."""
    if not part.flat:
        shutil.copytree(part.folder, dst)
        return
    cfg = _sub_config(part)
    if is_quantized(part):
        floats, qlinears, spec = read_quantized_submodel(part, lazy=True)
        writer = QuantizedCheckpointWriter(dst, spec.format, spec.bits, spec.group_size, spec.symmetric)
        for key, t in floats.items():
            writer.add_tensor(key, t)
        for name in tqdm(list(qlinears), desc=f"{part.name} (int4)", leave=False, disable=not progress):
            writer.add_linear(name, qlinears[name])
        not_convert = [m.removeprefix(part.prefix) for m in spec.modules_to_not_convert
                       if m.startswith(part.prefix) or m == "lm_head"]
        writer.finish(cfg, modules_to_not_convert=not_convert)
    else:
        writer = ShardWriter(dst)
        _stream(part, writer, "", desc=part.name, progress=progress)
        writer.finish_shards()
        write_json(dst / "config.json", {k: v for k, v in cfg.items() if k not in _QUANT_KEYS})
    write_side_files(part, dst)


def write_vila(config: NVILAConfig, out: Path, *, progress: bool = True) -> dict:
    """Write ``config``'s checkpoint in the three-folder layout into the empty folder ``out``. From the flat
    layout the LLM keeps its int4 format, the tower and projector their float tensors."""
    out = Path(out)
    if config.root is None:
        raise CheckpointError("config has no root folder; load it with NVILAConfig.from_pretrained(path)")
    manifest: dict[str, Any] = {"layout": "vila", "variant": config.variant, "source": str(config.root),
                                "source_layout": config.layout, "notes": []}
    if config.layout == "vila":
        shutil.copytree(config.root, out, dirs_exist_ok=True)
        manifest["notes"].append("same layout: copied")
    else:
        root = config.to_dict()
        for name in ("llm", "vision_tower", "mm_projector"):
            part = config.part(name)
            materialize_part(part, out / name, progress)
            sub = read_json(out / name / "config.json")
            root[f"{name}_cfg"] = {**sub, "_name_or_path": f"./{name}"}
        if "quantization_config" in (config.hf_config or {}):
            manifest["notes"].append("LLM int4 codes kept as they are (bit exact)")
        root["resume_path"] = "./"
        write_json(out / "config.json", root)
    manifest["files"] = sorted(p.name for p in out.iterdir())
    write_json(out / "nvila_quant_export.json", manifest)
    return manifest
