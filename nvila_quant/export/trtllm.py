"""``--to trtllm``: an NVILA checkpoint as TensorRT-LLM's PyTorch backend (``modeling_vila.py``) loads it.

Layout written into ``tmp`` (the caller renames it into place)::

    config.json               the source's root config: architectures ["LlavaLlamaModel"], model_type "llava_llama",
                              llm_cfg / vision_tower_cfg / mm_projector_cfg with _name_or_path "./llm" etc. (TRT-LLM
                              joins their basename to the root), a truthy resume_path (else it builds the projector
                              from scratch), model_dtype "torch.bfloat16" | "torch.float16"
    hf_quant_config.json      quantized LLM only: ModelOpt W4A16_AWQ (group size, exclude_modules)
    llm/                      config.json (model_max_length, no quantization_config), tokenizer, chat template;
                              quantized linears as ModelOpt tensors (see :mod:`nvila_quant.formats.modelopt`):
                                  <m>.weight (N/2, K) int8, <m>.weight_scale (N, K/G), <m>.bias (N,) float,
                                  <m>.pre_quant_scale (K,) ones, on the linears TRT-LLM loads unfused (o_proj,
                                  down_proj)
                              every other tensor float
    vision_tower/             copied (cast to bf16 when the source is fp32)
    mm_projector/             float ``layers.N.weight/bias`` (a quantized projector is dequantized)
    nvila_quant_export.json   the manifest: what was written and how

Refused before any file is written (ConfigError): LLM weights that are not 4-bit, asymmetric (zero points), with
more than one group size or a group size TRT-LLM's W4A16 kernels lack (64, 128), a fused group (q/k/v,
gate/up) that is part quantized, or an int4 lm_head (TRT-LLM's PyTorch backend builds its LMHead in float).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from nvila_quant import __version__
from nvila_quant.errors import ConfigError
from nvila_quant.formats import modelopt
from nvila_quant.formats.checkpoint import (
    METADATA_KEY,
    copy_side_files,
    detect_format,
    format_module,
    read_quantized_submodel,
    spec_from_config,
)
from nvila_quant.io import INDEX_NAME, SINGLE_NAME, Part, read_json, read_tensors, safetensors_key_map, write_json
from nvila_quant.model.config import load_config
from nvila_quant.model.quantized import float_projector_state
from nvila_quant.numerics.qtensor import QTensor

__all__ = ["FUSED", "GROUP_SIZES", "MANIFEST_NAME", "check_trtllm", "write_trtllm"]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "nvila_quant_export.json"
GROUP_SIZES = (64, 128)  # TRT-LLM's fine-grained W4A16 GEMM (fpA_intB) takes these only
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
"""TRT-LLM's fused linear -> the checkpoint linears it loads as one (same quantization, no pre_quant_scale read)."""
_QUANT_KEYS = ("quantization_config", "compression_config", METADATA_KEY)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


# ---------------------------------------------------------------------------------------------- shards
class _ShardWriter:
    """Stream tensors into HF-style safetensors shards (``model.safetensors`` or numbered shards + index)."""

    def __init__(self, folder: Path, max_shard_bytes: int = 2 * 1024**3) -> None:
        self.folder, self.max_shard_bytes = folder, max_shard_bytes
        folder.mkdir(parents=True, exist_ok=True)
        self._buffer: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._shards: list[tuple[Path, list[str], int]] = []
        self._keys: set[str] = set()

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._keys:
            raise ValueError(f"tensor {key!r} was already written")
        self._keys.add(key)
        t = tensor.detach().to("cpu", copy=True).contiguous()  # own storage: safetensors refuses shared views
        nbytes = t.numel() * t.element_size()
        if self._buffer and self._bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[key] = t
        self._bytes += nbytes

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self._shards) + 1:05d}.safetensors.tmp"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._buffer), self._bytes))
        self._buffer, self._bytes = {}, 0

    def finish(self) -> list[str]:
        """Final shard names and the index; returns the file names written."""
        if self._buffer:
            self._flush()
        n = len(self._shards)
        weight_map, total, names = {}, 0, []
        for i, (tmp, keys, nbytes) in enumerate(self._shards):
            name = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, self.folder / name)
            weight_map.update({k: name for k in keys})
            total += nbytes
            names.append(name)
        write_json(self.folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        return [*names, INDEX_NAME]


# ---------------------------------------------------------------------------------------------- checks
def _fused_name(module: str) -> tuple[str, tuple[str, ...]] | None:
    """``model.layers.0.self_attn.k_proj`` -> (``model.layers.0.self_attn.qkv_proj``, its members)."""
    parent, _, leaf = module.rpartition(".")
    for fused, members in FUSED.items():
        if leaf in members:
            return f"{parent}.{fused}", members
    return None


def _check_llm_quantization(llm_cfg: dict, llm_dir: Path | Part) -> tuple[int, list[str]]:
    """(the one group size, quantized module names) of a quantized ``llm/``; ConfigError when TRT-LLM cannot run
    it. Reads config.json and the shard headers only."""
    spec = spec_from_config(llm_cfg)
    where = f"{llm_dir}/config.json"
    if spec.bits != 4:
        raise ConfigError(f"{where}: TensorRT-LLM's W4A16_AWQ holds 4-bit weights only, got bits={spec.bits}; "
                          "re-quantize with --w-bit 4")
    if not spec.symmetric:
        raise ConfigError(f"{where}: the checkpoint was quantized with zero points (asymmetric), but TensorRT-LLM's "
                          f"W4A16_AWQ has none; {modelopt.SYMMETRIC_HINT}")
    modules = list(spec.quantized_modules or [])
    if not modules:  # a third-party checkpoint without our metadata: the tensor names say which
        marker = "." + format_module(spec.format).MARKER
        modules = [k.removesuffix(marker) for k in safetensors_key_map(llm_dir) if k.endswith(marker)]
    if "lm_head" in modules:
        raise ConfigError(
            f"{where}: lm_head is int4 (--quantize-lm-head), but TensorRT-LLM's PyTorch backend builds lm_head as a "
            "float LMHead without a quantization config (DecoderModelForCausalLM in "
            "tensorrt_llm/_torch/models/modeling_utils.py: \"lm_head Linear will not accept QuantConfig\"), so "
            "it cannot load a W4A16 head; re-quantize without --quantize-lm-head for TensorRT-LLM")
    groups = sorted({spec.group_size_for(m) for m in modules})
    if len(groups) > 1:
        raise ConfigError(f"{where}: W4A16_AWQ has one group size per checkpoint, but layers use {groups} (a "
                          "fallback for layers the main size does not divide); re-quantize with a group size that "
                          "fits every layer")
    if groups and groups[0] not in GROUP_SIZES:
        raise ConfigError(f"{where}: TensorRT-LLM's W4A16 kernels take group size {' or '.join(map(str, GROUP_SIZES))}"
                          f", got {groups[0]}; re-quantize with --group-size 128")
    quantized = set(modules)
    for m in modules:
        fused = _fused_name(m)
        if fused is None:
            continue
        parent = fused[0].rpartition(".")[0]
        part = [f"{parent}.{leaf}" in quantized for leaf in fused[1]]
        if not all(part):
            raise ConfigError(f"{where}: TensorRT-LLM fuses {', '.join(fused[1])} of {parent} into one linear, but "
                              f"only some of them are quantized ({m} is); quantize all or none")
    return (groups[0] if groups else spec.group_size), sorted(modules)


def _model_max_length(llm_cfg: dict, llm_dir: Path) -> tuple[int, str]:
    """``model_max_length`` (TRT-LLM's init_tokenizer reads it from llm/config.json) and where it came from."""
    if isinstance(llm_cfg.get("model_max_length"), int):
        return llm_cfg["model_max_length"], "llm/config.json"
    tok_path = llm_dir / "tokenizer_config.json"
    tok = read_json(tok_path) if tok_path.is_file() else {}
    value = tok.get("model_max_length")
    if isinstance(value, int) and value < 10**9:  # transformers writes ~1e30 for "unset"
        return value, "llm/tokenizer_config.json"
    if isinstance(llm_cfg.get("max_position_embeddings"), int):
        return llm_cfg["max_position_embeddings"], "max_position_embeddings"
    raise ConfigError(f"{llm_dir}: no model_max_length in config.json or tokenizer_config.json and no "
                      "max_position_embeddings to fall back on; TensorRT-LLM's tokenizer needs it")


def _set_dtype(cfg: dict, dtype: torch.dtype) -> dict:
    """Rewrite the dtype keys a config already has (``dtype`` / ``torch_dtype``; ``torch_dtype`` when neither)."""
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]
    return {**cfg, **{k: name for k in keys}}


def _strip_quant(cfg: Mapping) -> dict:
    return {k: v for k, v in cfg.items() if k not in _QUANT_KEYS}


# ---------------------------------------------------------------------------------------------- writing
def _layer_of(key: str) -> int | None:
    m = _LAYER.match(key)
    return int(m.group(1)) if m else None


def _write_llm(llm_dir: Path, out: Path, dtype: torch.dtype, quantized: bool, progress: bool) -> dict:
    """llm/ tensors: ModelOpt tensors for packed linears, every float tensor in ``dtype``. Returns a summary."""
    writer = _ShardWriter(out)
    if quantized:
        floats, packed, spec = read_quantized_submodel(llm_dir, lazy=True)
        float_keys, modules, source_format = list(floats), list(packed), spec.format

        def read(keys: list[str]) -> dict[str, torch.Tensor]:
            return {k: floats[k] for k in keys}
    else:
        key_map = safetensors_key_map(llm_dir)
        packed, float_keys, modules, source_format = {}, list(key_map), [], None

        def read(keys: list[str]) -> dict[str, torch.Tensor]:
            return read_tensors(key_map, keys)
    by_layer: dict[int | None, tuple[list[str], list[str]]] = {}
    for key in float_keys:
        by_layer.setdefault(_layer_of(key), ([], []))[0].append(key)
    for name in modules:
        by_layer.setdefault(_layer_of(name), ([], []))[1].append(name)
    layers = sorted(i for i in by_layer if i is not None)

    float_linears, with_pre_quant_scale = [], []
    order: list[int | None] = [None, *layers]
    for i in tqdm(order, desc="trtllm llm", unit="layer", leave=False, disable=not progress):
        keys, names = by_layer.get(i, ([], []))
        for key, t in read(keys).items():
            if key.endswith(".weight") and t.dim() == 2 and not key.endswith("embed_tokens.weight"):
                float_linears.append(key.removesuffix(".weight"))
            writer.add(key, t.to(dtype) if t.is_floating_point() else t)
        for name in names:
            qt: QTensor = packed[name]
            try:
                parts = modelopt.pack(qt)
            except ConfigError as e:
                raise ConfigError(f"{llm_dir}: {name}: {e}") from e
            writer.add(f"{name}.weight", parts["weight"])  # (N/2, K) int8
            writer.add(f"{name}.weight_scale", parts["weight_scale"])  # (N, K/G), the stored scales, bit exact
            if _fused_name(name) is None:  # TRT-LLM loads it unfused and requires pre_quant_scale (ones: AWQ folded)
                writer.add(f"{name}.pre_quant_scale", parts["pre_quant_scale"].to(dtype))  # (K,)
                with_pre_quant_scale.append(name)
            if qt.bias is not None:
                writer.add(f"{name}.bias", qt.bias.to(dtype))  # (N,)
    files = writer.finish()
    return {
        "source_format": source_format,
        "quantized_linears": sorted(modules),
        "float_linears": sorted(float_linears),
        "pre_quant_scale": sorted(with_pre_quant_scale),
        "files": files,
    }


def _exclude_modules(float_linears: list[str], quantized: list[str]) -> list[str]:
    """lm_head, every float linear, and TRT-LLM's fused name where all of a fused group is float."""
    names = set(float_linears) | {"lm_head"}
    quantized_set = set(quantized)
    for name in float_linears:
        fused = _fused_name(name)
        if fused is not None:
            parent = fused[0].rpartition(".")[0]
            if not any(f"{parent}.{leaf}" in quantized_set for leaf in fused[1]):
                names.add(fused[0])
    return sorted(names)


def _copy_float_folder(src: Path, dst: Path, dtype: torch.dtype | None) -> str:
    """Copy a float sub-model folder; with ``dtype`` rewrite its tensors (and config dtype) in that dtype."""
    if dtype is None:
        shutil.copytree(src, dst)
        return "copied"
    key_map = safetensors_key_map(src)
    writer = _ShardWriter(dst)
    for key in key_map:
        t = read_tensors(key_map, [key])[key]
        writer.add(key, t.to(dtype) if t.is_floating_point() else t)
    writer.finish()
    copy_side_files(src, dst)
    write_json(dst / "config.json", _set_dtype(read_json(src / "config.json"), dtype))
    return f"cast to {str(dtype).removeprefix('torch.')}"


def check_trtllm(llm: Part) -> None:
    """Refuse (ConfigError) an LLM TensorRT-LLM's W4A16_AWQ cannot run, from its config and shard headers only
    (either layout: ``NVILAConfig.part("llm")``)."""
    cfg = llm.read_config()
    if detect_format(cfg) is not None:
        _check_llm_quantization(cfg, llm)


def write_trtllm(src: Path, tmp: Path, *, progress: bool = True) -> dict:
    """Write the TensorRT-LLM layout of the three-folder NVILA checkpoint ``src`` into the empty folder ``tmp``.

    ``src`` is float or quantized by this package (autoawq, compressed-tensors or tinychat). Returns the manifest,
    also written as ``tmp/nvila_quant_export.json``. Raises ConfigError, before writing anything, for checkpoints
    TRT-LLM cannot run (see the module docstring)."""
    src, tmp = Path(src), Path(tmp)
    nv_config = load_config(src)
    llm_dir, vt_dir, mp_dir = (nv_config.subfolder(n) for n in ("llm", "vision_tower", "mm_projector"))
    root_cfg = read_json(src / "config.json")
    llm_cfg = read_json(llm_dir / "config.json")

    # decide everything (and refuse) before the first file is written
    source_dtype = nv_config.dtype
    dtype = torch.bfloat16 if source_dtype == torch.float32 else source_dtype
    llm_format = detect_format(llm_cfg)
    quantized = llm_format is not None
    group_size, quantized_modules = _check_llm_quantization(llm_cfg, llm_dir) if quantized else (None, [])
    max_length, max_length_from = _model_max_length(llm_cfg, llm_dir)
    projector_format = detect_format(read_json(mp_dir / "config.json"))
    if any(tmp.iterdir()):
        raise ConfigError(f"{tmp} must be an empty folder")

    # llm/
    llm_out = tmp / "llm"
    llm_summary = _write_llm(llm_dir, llm_out, dtype, quantized, progress)
    copy_side_files(llm_dir, llm_out)
    new_llm_cfg = _set_dtype(_strip_quant(llm_cfg), dtype)
    new_llm_cfg["model_max_length"] = max_length
    write_json(llm_out / "config.json", new_llm_cfg)

    # mm_projector/ (float; a quantized one dequantized, AWQ activation scales folded)
    mp_state, mp_cfg = float_projector_state(mp_dir, dtype)
    mp_out = tmp / "mm_projector"
    writer = _ShardWriter(mp_out)
    for key, t in mp_state.items():
        writer.add(key, t)
    writer.finish()
    copy_side_files(mp_dir, mp_out)
    mp_cfg = _set_dtype(_strip_quant(mp_cfg), dtype)
    write_json(mp_out / "config.json", mp_cfg)
    projector_how = f"dequantized from {projector_format}" if projector_format else (
        "copied" if dtype == source_dtype else f"cast to {str(dtype).removeprefix('torch.')}")

    # vision_tower/
    vision_how = _copy_float_folder(vt_dir, tmp / "vision_tower", None if dtype == source_dtype else dtype)
    vt_cfg = read_json(tmp / "vision_tower" / "config.json")

    # root config.json and hf_quant_config.json
    root = {k: v for k, v in _strip_quant(root_cfg).items() if k != "_name_or_path"}  # set on load to the root
    root.update({
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "llm_cfg": {**new_llm_cfg, "_name_or_path": "./llm"},
        "vision_tower_cfg": {**vt_cfg, "_name_or_path": "./vision_tower"},
        "mm_projector_cfg": {**mp_cfg, "_name_or_path": "./mm_projector"},
        "resume_path": root_cfg.get("resume_path") or "./",
        "model_dtype": str(dtype),
    })
    if any(k in root for k in ("dtype", "torch_dtype")):
        root = _set_dtype(root, dtype)
    write_json(tmp / "config.json", root)
    exclude = []
    if quantized:
        exclude = _exclude_modules(llm_summary["float_linears"], quantized_modules)
        write_json(tmp / "hf_quant_config.json",
                   modelopt.hf_quant_config(group_size, exclude, f"nvila-quant {__version__}"))

    notes = []
    if dtype != source_dtype:
        notes.append(f"the source is {str(source_dtype).removeprefix('torch.')}; written in "
                     f"{str(dtype).removeprefix('torch.')} (TensorRT-LLM's VILA takes model_dtype fp16 or bf16 only)")
    manifest = {
        "format": "trtllm",
        "version": 1,
        "tool": f"nvila-quant {__version__}",
        "source": str(src.absolute()),
        "source_dtype": str(source_dtype),
        "model_dtype": str(dtype),
        "quantization": None if not quantized else {
            "quant_algo": modelopt.QUANT_ALGO, "group_size": group_size, "source_format": llm_format,
            "how": "int4 codes repacked bit exactly (ModelOpt value = q - 8); scales as stored",
            "exclude_modules": exclude,
        },
        "llm": {
            "quantized_linears": len(llm_summary["quantized_linears"]),
            "float_linears": llm_summary["float_linears"],
            "pre_quant_scale": llm_summary["pre_quant_scale"],
            "model_max_length": max_length, "model_max_length_from": max_length_from,
            "files": llm_summary["files"],
        },
        "mm_projector": projector_how,
        "vision_tower": vision_how,
        "notes": notes,
    }
    write_json(tmp / MANIFEST_NAME, manifest)
    logger.info("wrote the TensorRT-LLM layout of %s (%s, %s)", src, manifest["model_dtype"],
                "W4A16_AWQ" if quantized else "float")
    return manifest
