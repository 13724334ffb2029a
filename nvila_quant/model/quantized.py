"""Quantized runtime: build ``llm/`` and ``mm_projector/`` with :class:`QuantLinear` modules from packed folders.

``NVILAQwen2.build_llm`` / ``build_projector`` call :func:`load_quantized_llm` / :func:`load_quantized_projector`
when a sub-folder's ``config.json`` carries quantization metadata (any of the three formats). The LLM skeleton is
built on the meta device (no float copy of the quantized weights is ever allocated), packed linears become
``QuantLinear`` modules, every other tensor loads from the checkpoint, and kernel repacks are built once at load.
Backend: "auto" unless ``NVILA_QUANT_BACKEND`` (cpu | cuda | reference; :class:`~nvila_quant.kernels.KernelSettings`)
says otherwise; :func:`set_backend` changes it on a loaded model.

:func:`convert_quantized_folder` repacks a quantized sub-model folder into another format (bit exact). Round-to-nearest
quantization of a float folder is the engine's (:func:`nvila_quant.quant.rtn.write_rtn_checkpoint`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedModel

from nvila_quant.errors import CheckpointError, ConfigError
from nvila_quant.formats import QuantizedCheckpointWriter, detect_format, read_quantized_submodel
from nvila_quant.formats.checkpoint import METADATA_KEY, copy_side_files
from nvila_quant.io import KeyMap, Part, as_part, read_tensors, tensor_shapes
from nvila_quant.kernels import BACKENDS, QuantLinear, kernel_settings
from nvila_quant.model.llm import quiet_transformers
from nvila_quant.model.projector import MultimodalProjector
from nvila_quant.numerics import QTensor

__all__ = [
    "check_tensor_shapes",
    "convert_quantized_folder",
    "float_projector_state",
    "llm_config_from_dict",
    "load_flat_llm",
    "is_quantized",
    "load_quantized_llm",
    "load_quantized_projector",
    "quantized_modules",
    "set_backend",
]

logger = logging.getLogger(__name__)


class PackedSlot(nn.Module):
    """Stands where a packed Linear goes while the LLM skeleton is built (no float weight is ever allocated for it):
    the Linear's (out_features, in_features, has bias), which the QuantLinear that replaces it must match."""

    def __init__(self, out_features: int, in_features: int, bias: bool) -> None:
        super().__init__()
        self.shape = (out_features, in_features, bias)


def is_quantized(folder: str | os.PathLike | Part) -> bool:
    """True when the sub-model's config carries quantization metadata (raises for unsupported schemes)."""
    part = as_part(folder)
    if part.config is None and not (part.folder / "config.json").is_file():
        return False
    try:
        return detect_format(part.read_config()) is not None
    except ConfigError as e:
        raise CheckpointError(f"{part} config: {e}") from e


def check_tensor_shapes(part: Part, key_map: KeyMap, expected: Mapping[str, tuple[int, ...]], what: str,
                        skip: Iterable[str] = ()) -> None:
    """Raise CheckpointError naming the first stored tensor whose shape differs from what the config implies (from
    the safetensors headers, before any data is read): the tensor, the shape in the file and the expected one."""
    skip = tuple(skip)
    names = [k for k in key_map if k in expected and not k.startswith(skip)]
    stored = tensor_shapes(key_map, names)
    for name in names:
        if tuple(stored[name]) != tuple(expected[name]):
            raise CheckpointError(
                f"{what}: tensor {key_map.stored_name(name)!r} in {key_map[name].name} has shape "
                f"{tuple(stored[name])} but its config implies {tuple(expected[name])} (a truncated or mismatched "
                f"file, or a config that does not belong to these weights; in {part})"
            )


def llm_config_from_dict(config: Mapping, where: object = "the LLM config") -> PretrainedConfig:
    """The transformers config of an LLM config.json dict, quantization keys dropped (the runtime handles them)."""
    data = {k: v for k, v in config.items() if k not in ("quantization_config", "compression_config", METADATA_KEY)}
    model_type = data.pop("model_type", None)
    if not model_type:
        raise CheckpointError(f"{where} lacks 'model_type' (e.g. 'qwen2')")
    try:
        with quiet_transformers():
            return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: cannot build a {model_type!r} config: {e}") from e


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def set_backend(model: nn.Module, backend: str) -> None:
    """Select the backend of every QuantLinear in ``model`` ("auto", "cpu", "cuda", "reference")."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for m in quantized_modules(model).values():
        m.backend = backend


def _install(model: nn.Module, qlinears: Mapping[str, QTensor], folder: Path, device: torch.device,
             dtype: torch.dtype) -> None:
    """Replace each packed module's nn.Linear by a QuantLinear holding its QTensor (shapes checked), its kernels
    prepared for ``dtype`` activations; one module at a time (with a lazy ``qlinears``, one unpacked QTensor is alive
    at a time)."""
    backend = kernel_settings().backend
    for name, qt in qlinears.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"{folder} has packed linear {name!r}, which the model does not have") from e
        if isinstance(old, PackedSlot):  # left by load_quantized_llm
            shape = old.shape
        else:
            if not isinstance(old, nn.Linear):
                raise CheckpointError(f"{folder}: {name!r} is a {type(old).__name__}, not a Linear, "
                                      "but has packed weights")
            shape = (old.out_features, old.in_features, old.bias is not None)
        n, k, has_bias = shape
        if (qt.out_features, qt.in_features) != (n, k):
            raise CheckpointError(
                f"{folder}: packed {name!r} is ({qt.out_features}, {qt.in_features}) "
                f"but the model's Linear is ({n}, {k})"
            )
        if (qt.bias is not None) != has_bias:
            raise CheckpointError(
                f"{folder}: packed {name!r} {'has' if qt.bias is not None else 'lacks'} a bias but the model's Linear "
                f"{'has' if has_bias else 'has none'}"
            )
        new = QuantLinear.from_qtensor(qt, backend=backend).to(device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        new.prepare(x_dtype=dtype)


def _load_floats(model: nn.Module, floats: dict[str, torch.Tensor], folder: Path,
                 ignore_missing: Iterable[str] = ()) -> None:
    quant_prefixes = tuple(f"{n}." for n in quantized_modules(model))
    expected = {k for k in model.state_dict() if not k.startswith(quant_prefixes)}
    missing = sorted(expected - set(floats) - set(ignore_missing))
    unexpected = sorted(set(floats) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {folder} do not match the model: missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}"
        )
    state = model.state_dict()
    for key, tensor in floats.items():
        if tuple(tensor.shape) != tuple(state[key].shape):
            raise CheckpointError(f"{folder}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(state[key].shape)}")
    # the model's own tensors are replaced, not copied into: the float parts (embeddings, lm_head) are held once
    cast = {k: v.to(device=state[k].device, dtype=state[k].dtype if v.is_floating_point() else v.dtype)
            for k, v in floats.items()}
    model.load_state_dict(cast, strict=False, assign=True)


def _reset_non_persistent_buffers(model: nn.Module, device: torch.device) -> None:
    """Rebuild modules whose non-persistent buffers (rotary inv_freq) were left empty by meta construction."""
    for name, module in list(model.named_modules()):
        if not getattr(module, "_non_persistent_buffers_set", None) or isinstance(module, QuantLinear):
            continue
        try:
            fresh = type(module)(config=model.config)
        except TypeError as e:
            raise CheckpointError(f"cannot initialise the buffers of {name!r} ({type(module).__name__}) "
                                  "for a quantized model") from e
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, fresh.to(device))


def materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """Give the non-persistent buffers a meta-built model left on the meta device (rotary ``inv_freq``, SigLIP's
    ``position_ids``) their real values: each owning module is built again from the config and its buffers taken."""
    config = getattr(model, "config", None)
    for name, module in list(model.named_modules()):
        meta = [b for b, t in module.named_buffers(recurse=False) if t.device.type == "meta"]
        if not meta:
            continue
        try:
            with torch.device("cpu"):
                fresh = type(module)(config=config)
        except TypeError as e:
            raise CheckpointError(f"cannot initialise the buffers {meta} of {name!r} "
                                  f"({type(module).__name__})") from e
        for b in meta:
            persistent = b not in module._non_persistent_buffers_set
            module.register_buffer(b, getattr(fresh, b).to(device), persistent=persistent)


def release_freed_memory() -> None:
    """Give the heap memory the loaders' temporaries freed (unpacked codes, repacks) back to the OS.

    glibc keeps freed chunks of its heaps and per-thread arenas for reuse, so without this the resident size after a
    load varies from run to run by up to the model's size again (benchmarks/loading.py measures it).
    ``malloc_trim(0)`` returns them; a no-op where glibc is absent."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    with contextlib.suppress(AttributeError):
        libc.malloc_trim(0)


def _llm_skeleton(part: Part, config: Mapping, dtype: torch.dtype) -> PreTrainedModel:
    try:
        with quiet_transformers(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(llm_config_from_dict(config, part), dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot build the LLM of {part}: {e}") from e


def _finish_llm(llm: PreTrainedModel, part: Part) -> PreTrainedModel:
    if (part.folder / "generation_config.json").is_file():
        llm.generation_config = GenerationConfig.from_pretrained(str(part.folder))
    release_freed_memory()
    return llm.eval()


def load_flat_llm(source: str | os.PathLike | Part, dtype: torch.dtype, device: torch.device | str) -> PreTrainedModel:
    """A float LLM read tensor by tensor into a skeleton built from its config (the flat -hf layout, where the LLM's
    tensors are prefixed and transformers' ``from_pretrained`` cannot take them)."""
    part, device = as_part(source), torch.device(device)
    llm = _llm_skeleton(part, part.read_config(), dtype)
    key_map = part.key_map()
    tied = bool(getattr(llm.config, "tie_word_embeddings", False))
    expected = {k: tuple(v.shape) for k, v in llm.state_dict().items()}
    check_tensor_shapes(part, key_map, expected, "the LLM")
    missing = sorted(set(expected) - set(key_map) - ({"lm_head.weight"} if tied else set()))
    unexpected = sorted(set(key_map) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"weights in {part} do not match the LLM config: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    llm.load_state_dict(read_tensors(key_map, list(key_map), dtype, device), strict=False, assign=True)
    materialize_buffers(llm, device)
    if tied:
        llm.tie_weights()
    left = [n for n, t in [*llm.named_parameters(), *llm.named_buffers()] if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"weights in {part} leave {left[:4]} of the LLM unset")
    return _finish_llm(llm, part)


def load_quantized_llm(source: str | os.PathLike | Part, dtype: torch.dtype,
                       device: torch.device | str) -> PreTrainedModel:
    """The LLM of a quantized ``llm/`` (or the ``llm.`` part of a flat checkpoint) as a transformers causal LM whose
    packed linears are QuantLinear."""
    part, device = as_part(source), torch.device(device)
    floats, qlinears, spec = read_quantized_submodel(part, lazy=True)
    llm = _llm_skeleton(part, part.read_config(), dtype)
    # packed linears stay off the float allocation: swap in shape-carrying placeholders first
    for name in qlinears:
        try:
            old = llm.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"{part} has packed linear {name!r}, which {type(llm).__name__} "
                                  "does not have") from e
        if not isinstance(old, nn.Linear):
            raise CheckpointError(f"{part}: {name!r} is a {type(old).__name__}, not a Linear, "
                                  "but has packed weights")
        holder = PackedSlot(old.out_features, old.in_features, old.bias is not None)
        parent, _, child = name.rpartition(".")
        setattr(llm.get_submodule(parent) if parent else llm, child, holder)
    llm = llm.to_empty(device=device)
    _reset_non_persistent_buffers(llm, device)
    _install(llm, qlinears, part, device, dtype)
    tied = bool(getattr(llm.config, "tie_word_embeddings", False))
    _load_floats(llm, floats, part, ignore_missing=("lm_head.weight",) if tied else ())
    if tied and not isinstance(llm.get_output_embeddings(), QuantLinear):
        llm.tie_weights()
    llm.nvila_quant_spec = spec
    return _finish_llm(llm, part)


def load_quantized_projector(
    mp_dir: str | os.PathLike | Part, projector_type: str, mm_hidden_size: int, hidden_size: int,
    dtype: torch.dtype, device: torch.device | str,
) -> MultimodalProjector:
    """A MultimodalProjector whose packed linears (e.g. ``layers.2``) are QuantLinear modules."""
    part, device = as_part(mp_dir), torch.device(device)
    floats, qlinears, spec = read_quantized_submodel(part, lazy=True)
    projector = MultimodalProjector(projector_type, mm_hidden_size, hidden_size).to(device=device, dtype=dtype)
    _install(projector, qlinears, part, device, dtype)
    projector.scale_activations(part.read_config().get("scaled_activations", []))  # AWQ GELU -> Linear
    _load_floats(projector, floats, part)
    projector.nvila_quant_spec = spec
    release_freed_memory()
    return projector.eval()


def float_projector_state(source: str | os.PathLike | Part, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    """A quantized projector as the plain float projector the serving engines build: ``layers.N.weight/bias``.

    Packed linears are dequantized (exactly the weights the runtime multiplies by); an AWQ activation scale
    (``act(x) / s`` before a Linear, ``scaled_activations``) is folded into that Linear's input columns
    (``W[:, j] / s[j]``), which the engines' plain GELU needs. Returns (state dict, projector config without the
    quantization keys). A float projector is returned as stored (cast to ``dtype``)."""
    part = as_part(source)
    config = part.read_config()
    plain = {k: v for k, v in config.items()
             if k not in ("quantization_config", "compression_config", METADATA_KEY, "scaled_activations")}
    if not is_quantized(part):
        return read_tensors(part.key_map(), list(part.key_map()), dtype), plain
    floats, qlinears, _ = read_quantized_submodel(part)
    state: dict[str, torch.Tensor] = {}
    scales = {}
    for key, t in floats.items():
        if key.endswith(".scales") and key.removesuffix(".scales") in config.get("scaled_activations", []):
            scales[key.removesuffix(".scales")] = t.float()
        else:
            state[key] = t.to(dtype) if t.is_floating_point() else t
    weights = {name: qt.dequantize().float() for name, qt in qlinears.items()}
    for name, qt in qlinears.items():
        if qt.bias is not None:
            state[f"{name}.bias"] = qt.bias.to(dtype)
    for act, s in scales.items():  # layers.3 (GELU) scales the input of layers.4
        index = act.rsplit(".", 1)
        nxt = f"{index[0]}.{int(index[1]) + 1}" if len(index) == 2 and index[1].isdigit() else None
        if nxt is None or (nxt not in weights and f"{nxt}.weight" not in state):
            raise CheckpointError(f"{part}: activation scale {act!r} precedes no Linear")
        if nxt in weights:
            weights[nxt] = weights[nxt] / s.view(1, -1)
        else:
            state[f"{nxt}.weight"] = (state[f"{nxt}.weight"].float() / s.view(1, -1)).to(dtype)
    for name, w in weights.items():
        state[f"{name}.weight"] = w.to(dtype)
    return dict(sorted(state.items())), plain


# ---------------------------------------------------------------------------------------------- conversion
def convert_quantized_folder(src: str | os.PathLike, dst: str | os.PathLike, fmt: str) -> Path:
    """Repack a quantized sub-model folder (``llm/`` or ``mm_projector/``) into ``fmt``, bit exact."""
    src, dst = Path(src), Path(dst)
    floats, qlinears, spec = read_quantized_submodel(src, lazy=True)
    writer = QuantizedCheckpointWriter(dst, fmt, spec.bits, spec.group_size, spec.symmetric)
    for key, tensor in floats.items():
        writer.add_tensor(key, tensor)
    for name, qt in qlinears.items():
        writer.add_linear(name, qt)
    copy_side_files(src, dst)
    writer.finish(as_part(src).read_config(), modules_to_not_convert=spec.modules_to_not_convert)
    return dst

