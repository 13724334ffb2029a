"""Read and write quantized sub-model folders (``llm/``, ``mm_projector/``) in any of the three formats.

A folder holds HF-style safetensors shards (``model.safetensors`` or ``model-0000i-of-0000n.safetensors``),
always an index ``model.safetensors.index.json``, and ``config.json`` = the sub-model's config plus:

- ``quantization_config``: the format's standard block (AutoAWQ ``awq``/``gemm``, compressed-tensors
  ``config_groups`` or, for tinychat, AutoAWQ's key set with ``version: "gemv_fast"``), so ``llm/`` alone loads
  in vLLM / SGLang / transformers for ``autoawq`` and vLLM / SGLang for ``compressed-tensors``;
- ``nvila_quant``: this package's own record, which makes every round trip exact::

      {"version": 1, "format": "autoawq", "bits": 4, "group_size": 128, "symmetric": false,
       "quantized_modules": ["model.layers.0.self_attn.q_proj", ...],
       "module_overrides": {"layers.2": {"group_size": 64}}}

Third-party checkpoints without ``nvila_quant`` are read from ``quantization_config`` alone.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import save_file

from nvila_quant.errors import CheckpointError, ConfigError
from nvila_quant.formats import autoawq, compressed_tensors, tinychat
from nvila_quant.io import INDEX_NAME, SINGLE_NAME, Part, as_part, read_tensors, write_json
from nvila_quant.numerics.qtensor import QTensor

__all__ = [
    "FORMATS",
    "METADATA_KEY",
    "PackedLinears",
    "QuantSpec",
    "QuantizedCheckpointWriter",
    "ShardWriter",
    "check_packable",
    "convert_linear",
    "copy_side_files",
    "detect_format",
    "format_module",
    "pack_linear",
    "read_quantized_submodel",
    "spec_from_config",
    "unpack_linear",
]

FORMATS = ("autoawq", "compressed-tensors", "tinychat")
METADATA_KEY = "nvila_quant"
_MODULES: dict[str, ModuleType] = {"autoawq": autoawq, "compressed-tensors": compressed_tensors, "tinychat": tinychat}


def format_module(fmt: str) -> ModuleType:
    """The module implementing ``fmt`` (``check``, ``pack``, ``unpack``, ``quantization_config``, ...)."""
    if fmt not in _MODULES:
        raise ConfigError(f"unknown quantized checkpoint format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return _MODULES[fmt]


def check_packable(fmt: str, bits: int, group_size: int, shape: tuple[int, int]) -> None:
    """Raise ConfigError (expected vs got) unless a (out_features, in_features) weight packs in ``fmt``."""
    format_module(fmt).check(bits, group_size, tuple(shape))


def pack_linear(fmt: str, qt: QTensor) -> dict[str, torch.Tensor]:
    """QTensor -> the format's tensors, keyed by suffix (``qweight``, ``weight_packed``, ..., ``bias``): the
    format's packed weight (its ``pack``) plus the float bias, stored the same way in every format."""
    out = format_module(fmt).pack(qt)
    if qt.bias is not None:
        out["bias"] = qt.bias
    return out


def unpack_linear(
    fmt: str, tensors: Mapping[str, torch.Tensor], bits: int, group_size: int, symmetric: bool, module: str = "?"
) -> QTensor:
    """The format's tensors (keyed by suffix) -> canonical QTensor, with shape/dtype/metadata checks."""
    qt = format_module(fmt).unpack(tensors, bits, group_size, symmetric, module)
    if symmetric and not bool((qt.zero == 2 ** (bits - 1)).all()):
        raise CheckpointError(
            f"{module}: metadata says symmetric but the stored zero points are not all {2 ** (bits - 1)}"
        )
    return qt


def convert_linear(tensors: Mapping[str, torch.Tensor], src: str, dst: str, bits: int, group_size: int,
                   symmetric: bool) -> dict[str, torch.Tensor]:
    """Repack one module's tensors from format ``src`` to ``dst`` (bit exact, through the canonical form)."""
    return pack_linear(dst, unpack_linear(src, tensors, bits, group_size, symmetric))


# ---------------------------------------------------------------------------------------------- metadata
@dataclass
class QuantSpec:
    """What a quantized folder holds: format, bits, default group size, symmetry and per-module overrides."""

    format: str
    bits: int
    group_size: int
    symmetric: bool
    module_overrides: dict[str, int] = field(default_factory=dict)  # module name -> group size
    modules_to_not_convert: list[str] = field(default_factory=list)
    quantized_modules: list[str] | None = None  # None: unknown (third-party checkpoint), found from tensors

    def group_size_for(self, module: str) -> int:
        return self.module_overrides.get(module, self.group_size)

    def metadata(self) -> dict:
        return {
            "version": 1,
            "format": self.format,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "quantized_modules": list(self.quantized_modules or []),
            "module_overrides": {k: {"group_size": g} for k, g in sorted(self.module_overrides.items())},
        }


def _quant_config(config: Mapping) -> dict | None:
    qc = config.get("quantization_config") or config.get("compression_config")
    if qc is None and "quant_method" in config:  # a bare quantization_config
        qc = config
    if qc is not None and not isinstance(qc, Mapping):
        raise ConfigError(f"quantization_config must be a JSON object, got {type(qc).__name__}")
    return dict(qc) if qc else None


def detect_format(config: dict) -> str | None:
    """Which of FORMATS a (sub-model) config.json describes; None when it has no quantization_config.

    Raises ConfigError for quantization schemes this package cannot read (e.g. GPTQ, AWQ "gemv")."""
    meta = config.get(METADATA_KEY)
    qc = _quant_config(config)
    if qc is None:
        if meta:
            raise ConfigError(f"config has '{METADATA_KEY}' metadata but no quantization_config")
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        fmt = {"gemm": "autoawq", "gemv_fast": "tinychat"}.get(version)
        if fmt is None:
            raise ConfigError(f"AWQ version {version!r} is not supported; "
                              "expected 'gemm' (autoawq) or 'gemv_fast' (tinychat)")
    elif method == "compressed-tensors":
        packing = qc.get("format")
        groups = qc.get("config_groups") or {}
        formats = {packing} | {g.get("format") for g in groups.values() if isinstance(g, Mapping) and g.get("format")}
        if formats - {"pack-quantized", None} or packing is None and not groups:
            raise ConfigError(f"compressed-tensors format {sorted(f for f in formats if f)} is not supported; "
                              "expected 'pack-quantized'")
        fmt = "compressed-tensors"
    else:
        raise ConfigError(f"quant_method {qc.get('quant_method')!r} is not supported; "
                          "expected 'awq' or 'compressed-tensors'")
    if meta and meta.get("format") != fmt:
        raise CheckpointError(f"'{METADATA_KEY}' metadata says format {meta.get('format')!r} "
                              f"but quantization_config says {fmt!r}")
    return fmt


def _ct_group(weights: Mapping) -> tuple[int, int, bool]:
    if weights.get("type", "int") != "int":
        raise ConfigError(f"compressed-tensors weights of type {weights.get('type')!r} are not supported; "
                          "expected 'int'")
    strategy = weights.get("strategy", "group")
    if strategy not in ("group", "channel"):
        raise ConfigError(f"compressed-tensors strategy {strategy!r} is not supported; expected 'group' or 'channel'")
    actorder = weights.get("actorder")
    if actorder is True or actorder in ("group", "weight"):  # "static" keeps the groups in column order: fine
        raise ConfigError(
            f"compressed-tensors activation ordering (actorder={actorder!r}) puts each input column in the group its "
            "weight_g_idx names, which this runtime does not apply; re-quantize with actorder None or 'static'"
        )
    g = -1 if strategy == "channel" or weights.get("group_size") in (None, -1) else int(weights["group_size"])
    return int(weights.get("num_bits", 4)), g, bool(weights.get("symmetric", True))


def spec_from_config(config: Mapping) -> QuantSpec:
    """QuantSpec of a config.json (``nvila_quant`` metadata when present, else the standard block)."""
    fmt = detect_format(dict(config))
    if fmt is None:
        raise CheckpointError("config.json has no quantization_config: the folder is not quantized")
    qc = _quant_config(config) or {}
    overrides: dict[str, int] = {}
    if fmt == "compressed-tensors":
        groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, Mapping)]
        if not groups:
            raise ConfigError("compressed-tensors quantization_config has no config_groups")
        bits, group_size, symmetric = _ct_group(groups[0].get("weights") or {})
        for grp in groups[1:]:
            b, g, s = _ct_group(grp.get("weights") or {})
            if (b, s) != (bits, symmetric):
                raise ConfigError("mixed bits/symmetry across config_groups is not supported "
                                  f"(got {b}/{s} vs {bits}/{symmetric})")
            overrides.update({t: g for t in grp.get("targets", [])
                              if not t.startswith("re:") and ("." in t or t == "lm_head")})
        not_convert = list(qc.get("ignore") or [])
    else:
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        group_size = int(qc.get("group_size", qc.get("q_group_size", 128)))
        symmetric = not qc.get("zero_point", True)
        not_convert = list(qc.get("modules_to_not_convert") or [])
    spec = QuantSpec(fmt, bits, group_size, symmetric, overrides, not_convert)
    meta = config.get(METADATA_KEY)
    if meta:
        if int(meta.get("bits", bits)) != bits or int(meta.get("group_size", group_size)) != group_size:
            raise CheckpointError(
                f"'{METADATA_KEY}' metadata (bits={meta.get('bits')}, group_size={meta.get('group_size')}) disagrees "
                f"with quantization_config (bits={bits}, group_size={group_size})"
            )
        spec.symmetric = bool(meta.get("symmetric", symmetric))
        spec.module_overrides = {k: int(v["group_size"]) for k, v in (meta.get("module_overrides") or {}).items()}
        spec.quantized_modules = list(meta.get("quantized_modules") or [])
    return spec


# ---------------------------------------------------------------------------------------------- writing
class ShardWriter:
    """Stream tensors into HF-style safetensors shards + index (memory bounded by one shard).

    >>> w = ShardWriter(out)
    >>> w.add_tensor("vision_tower.vision_model.embeddings.patch_embedding.weight", t)
    >>> w.finish()  # model.safetensors or model-0000i-of-0000n.safetensors, and model.safetensors.index.json
    """

    def __init__(self, folder: Path, max_shard_bytes: int = 2 * 1024**3) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str], int]] = []  # (temporary path, keys, bytes)
        self._keys: set[str] = set()
        self._finished = False

    def _put(self, key: str, tensor: torch.Tensor) -> None:
        if self._finished:
            raise RuntimeError("the writer is finished; create a new one")
        if key in self._keys:
            raise ValueError(f"tensor {key!r} was already written")
        t = tensor.detach().to("cpu", copy=True).contiguous()  # own storage: safetensors refuses shared views
        nbytes = t.numel() * t.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._keys.add(key)
        self._buffer[key] = t
        self._buffer_bytes += nbytes

    def _flush(self) -> None:
        if not self._buffer:
            return
        path = self.folder / f".shard-{len(self._shards) + 1:05d}.safetensors.tmp"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._buffer), self._buffer_bytes))
        self._buffer, self._buffer_bytes = {}, 0

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """A tensor under its checkpoint key (e.g. ``model.embed_tokens.weight``)."""
        self._put(name, tensor)

    def finish_shards(self) -> None:
        """Write the last shard, give shards their final names, and the index."""
        if self._finished:
            raise RuntimeError("finish() was already called")
        self._flush()
        if not self._shards:
            raise ValueError(f"nothing was written to {self.folder}")
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        total = 0
        for i, (tmp, keys, nbytes) in enumerate(self._shards):
            name = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, self.folder / name)
            weight_map.update({k: name for k in keys})
            total += nbytes
        write_json(self.folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        self._finished = True


class QuantizedCheckpointWriter(ShardWriter):
    """Stream float tensors and packed linears into safetensors shards (memory bounded by one shard).

    >>> w = QuantizedCheckpointWriter(out / "llm", "autoawq", bits=4, group_size=128, symmetric=False)
    >>> w.add_tensor("model.embed_tokens.weight", emb)
    >>> w.add_linear("model.layers.0.self_attn.q_proj", qt)
    >>> w.finish(llm_config_dict, modules_to_not_convert=["lm_head"])

    ``module_prefix``: the prefix of the quantized sub-model's keys in a flat checkpoint (``"llm."``): the linears are
    written under their full keys, the metadata names them without it (as the sub-model sees them).
    """

    def __init__(self, folder: Path, fmt: str, bits: int, group_size: int, symmetric: bool,
                 max_shard_bytes: int = 2 * 1024**3, module_prefix: str = "") -> None:
        self.module = format_module(fmt)
        if bits not in self.module.BITS:
            raise ConfigError(f"{fmt} packs only {list(self.module.BITS)}-bit weights, got bits={bits}")
        if group_size != -1 and group_size <= 0:
            raise ConfigError(f"group_size must be -1 (per channel) or positive, got {group_size}")
        super().__init__(folder, max_shard_bytes)
        self.fmt, self.bits, self.group_size, self.symmetric = fmt, bits, group_size, symmetric
        self.module_prefix = module_prefix
        self._modules: list[str] = []
        self._overrides: dict[str, int] = {}

    def add_linear(self, name: str, qt: QTensor) -> None:
        """A quantized Linear under its module name: writes the format's packed tensors (+ bias)."""
        if qt.bits != self.bits or qt.symmetric != self.symmetric:
            raise ConfigError(
                f"{name}: the writer holds bits={self.bits}, symmetric={self.symmetric}, "
                f"got a QTensor with bits={qt.bits}, symmetric={qt.symmetric}"
            )
        try:
            check_packable(self.fmt, qt.bits, qt.group_size, tuple(qt.q.shape))
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from e
        module = name.removeprefix(self.module_prefix)
        if module in self._modules:
            raise ValueError(f"linear {name!r} was already written")
        for suffix, tensor in pack_linear(self.fmt, qt).items():
            self._put(f"{name}.{suffix}", tensor)
        self._modules.append(module)
        if qt.group_size != self.group_size:
            self._overrides[module] = qt.group_size

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.fmt, self.bits, self.group_size, self.symmetric, dict(self._overrides),
                         quantized_modules=list(self._modules))

    def quantized_config(self, config: dict, modules_to_not_convert: list[str] | None = None) -> dict:
        """``config`` with the format's ``quantization_config`` and this package's metadata. A packed ``lm_head``
        is stated the way the engines look for it (``"lm_head": true``; a compressed-tensors target) and must not be
        in ``modules_to_not_convert``."""
        not_convert = list(modules_to_not_convert or [])
        lm_head = "lm_head" in self._modules
        if lm_head and "lm_head" in not_convert:
            raise ConfigError("lm_head is packed but listed in modules_to_not_convert: the engines would skip it")
        if self.fmt == "compressed-tensors":
            qc = compressed_tensors.quantization_config(self.bits, self.group_size, self.symmetric, not_convert,
                                                        self._overrides, lm_head=lm_head)
        else:
            qc = self.module.quantization_config(self.bits, self.group_size, self.symmetric, not_convert,
                                                 lm_head=lm_head)
        spec = self.spec
        spec.modules_to_not_convert = not_convert
        out = {k: v for k, v in config.items() if k not in ("quantization_config", "compression_config", METADATA_KEY)}
        out["quantization_config"] = qc
        out[METADATA_KEY] = spec.metadata()
        return out

    def finish(self, config: dict, modules_to_not_convert: list[str] | None = None) -> None:
        """Write the last shard, give shards their final names, the index, and config.json."""
        self.finish_shards()
        write_json(self.folder / "config.json", self.quantized_config(config, modules_to_not_convert))


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy the files of sub-model folder ``src`` that the writer does not write (tokenizer, generation config,
    chat template, ...): everything but safetensors shards, their index and ``config.json``."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(src).iterdir()):
        weights = f.suffix == ".safetensors" or f.name.endswith(".safetensors.index.json") or f.name == "config.json"
        if f.is_file() and not weights:
            shutil.copy2(f, dst / f.name)


# ---------------------------------------------------------------------------------------------- reading
def _selected(key: str, names: list[str] | None) -> bool:
    return names is None or any(key == n or key.startswith(n + ".") for n in names)


class PackedLinears(Mapping[str, QTensor]):
    """The packed linears of a quantized folder by module name, each read from its shard and unpacked when it is
    looked up, never kept: going through them holds one module's canonical (unpacked) form at a time, so a loader
    that packs each one into its runtime layout never holds the whole model unpacked (2x its int4 bytes)."""

    def __init__(self, spec: QuantSpec, parts_of: Mapping[str, Mapping[str, str]], key_map: Mapping[str, Path],
                 device: str | torch.device) -> None:
        self.spec, self.parts_of, self.key_map, self.device = spec, parts_of, key_map, device

    def __getitem__(self, module: str) -> QTensor:
        keys = self.parts_of[module]  # {suffix: key}
        loaded = read_tensors(self.key_map, keys.values(), device=self.device)
        parts = {suffix: loaded[key] for suffix, key in keys.items()}
        spec = self.spec
        return unpack_linear(spec.format, parts, spec.bits, spec.group_size_for(module), spec.symmetric, module)

    def __iter__(self):  # noqa: ANN204 (Mapping signature)
        return iter(self.parts_of)

    def __len__(self) -> int:
        return len(self.parts_of)


def read_quantized_submodel(
    folder: str | os.PathLike | Part, names: Iterable[str] | None = None, device: str | torch.device = "cpu",
    lazy: bool = False,
) -> tuple[dict[str, torch.Tensor], Mapping[str, QTensor], QuantSpec]:
    """Read a quantized folder: (float tensors by key, canonical QTensors by module name, QuantSpec).

    ``folder``: a quantized sub-model folder, or a :class:`~nvila_quant.io.Part` (a prefix in a flat checkpoint).
    ``names`` restricts reading to modules, tensor keys or dotted prefixes (``"model.layers.3"``). ``lazy``: the
    QTensors come as :class:`PackedLinears`, each read and unpacked when looked up (loaders that convert one module
    at a time then peak at one module's unpacked form, not the model's); else a dict of all of them.
    Raises CheckpointError when metadata and tensors disagree (missing/extra modules, shapes, dtypes); with ``lazy``,
    a module's shapes and dtypes are checked when it is looked up.
    """
    part = as_part(folder)
    folder = part  # messages name the folder (and the key prefix of a flat checkpoint)
    config = part.read_config()
    try:
        spec = spec_from_config(config)
    except ConfigError as e:
        raise CheckpointError(f"{part.folder / 'config.json'}: {e}") from e
    fmt = format_module(spec.format)
    key_map = part.key_map()
    marker = "." + fmt.MARKER
    found = sorted(k[: -len(marker)] for k in key_map if k.endswith(marker))
    if spec.quantized_modules is not None:
        missing = sorted(set(spec.quantized_modules) - set(found))
        extra = sorted(set(found) - set(spec.quantized_modules))
        if missing or extra:
            raise CheckpointError(
                f"{folder}: config.json lists quantized modules that disagree with the tensors: "
                f"no '{fmt.MARKER}' for {missing[:4]}; unlisted '{fmt.MARKER}' for {extra[:4]}"
            )
    if not found:
        other = {m.MARKER for f, m in _MODULES.items() if f != spec.format} - {fmt.MARKER}
        hint = [k for k in key_map if k.rsplit(".", 1)[-1] in other][:2]
        raise CheckpointError(
            f"{folder}: config.json says {spec.format} but no tensor ends in '{fmt.MARKER}'"
            + (f" (found {hint}: another format?)" if hint else "")
        )
    wanted = None if names is None else list(names)
    modules = [m for m in found if _selected(m, wanted)]
    parts_of: dict[str, dict[str, str]] = {m: {} for m in found}  # module -> {suffix: key}
    floats = []
    for key in key_map:
        mod, _, suffix = key.rpartition(".")
        if mod not in parts_of:
            if _selected(key, wanted):
                floats.append(key)
        elif suffix in fmt.SUFFIXES:
            parts_of[mod][suffix] = key
        elif suffix.endswith("g_idx"):
            raise CheckpointError(f"{folder}: {key!r} is a per-column group index (activation-ordered GPTQ), "
                                  "which this runtime does not apply; re-quantize without activation ordering")
        else:
            raise CheckpointError(f"{folder}: unexpected tensor {key!r} for a {spec.format} module "
                                  f"(expected {fmt.SUFFIXES})")
    if wanted is not None:
        unmatched = [n for n in wanted if not any(_selected(k, [n]) for k in [*modules, *floats])]
        if unmatched:
            raise CheckpointError(f"{folder} has no tensors or modules named {unmatched[:4]}")

    float_tensors = read_tensors(key_map, floats, device=device)
    if spec.quantized_modules is None:
        spec.quantized_modules = found
    packed = PackedLinears(spec, {m: parts_of[m] for m in modules}, key_map, device)
    return float_tensors, packed if lazy else {m: packed[m] for m in packed}, spec
