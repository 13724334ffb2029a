"""Checkpoint file I/O: validated safetensors reading, sharded writing, atomic output folders.

Nothing here unpickles: weights are safetensors only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nvila_quant.errors import CheckpointError, OutputExistsError

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "KeyMap",
    "Part",
    "as_part",
    "atomic_output_dir",
    "check_output_dir",
    "list_weight_files",
    "load_state_dict",
    "read_json",
    "read_tensors",
    "safetensors_key_map",
    "tensor_shapes",
    "save_state_dict",
    "validate_safetensors",
    "write_json",
]

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object, raising CheckpointError that names the file when it is missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def write_json(path: str | os.PathLike, data: Mapping) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def validate_safetensors(path: str | os.PathLike) -> dict[str, dict]:
    """Check a safetensors file's header and size without reading tensor data.

    Returns the header ({name: {"dtype", "shape", "data_offsets"}}, without "__metadata__").
    Raises CheckpointError naming the file when it is truncated, corrupt or not safetensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing weights file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes): not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise CheckpointError(f"{path} is corrupt or truncated: header length {n} exceeds file size {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not valid JSON ({e})") from e
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            begin, stop = info["data_offsets"]
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
            expect = numel * _DTYPE_BYTES.get(info["dtype"], 0)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path} is corrupt: bad header entry for tensor {name!r}") from e
        if info["dtype"] in _DTYPE_BYTES and stop - begin != expect:
            raise CheckpointError(
                f"{path} is corrupt: tensor {name!r} spans {stop - begin} bytes but its shape "
                f"{info['shape']} and dtype {info['dtype']} need {expect}"
            )
        end = max(end, stop)
    if 8 + n + end != size:
        raise CheckpointError(
            f"{path} is truncated or corrupt: the header describes {8 + n + end} bytes but the file has {size}"
        )
    return header


def list_weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a HF-style folder (single file or sharded with an index)."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = sorted({folder / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index} names shard {f.name}, which is missing from {folder}")
        return files
    single = folder / SINGLE_NAME
    if single.is_file():
        return [single]
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickled:
        raise CheckpointError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}); pickles are never loaded. "
            "Convert them to safetensors first."
        )
    raise CheckpointError(f"no safetensors weights in {folder} (expected {SINGLE_NAME} or {INDEX_NAME})")


class KeyMap(dict[str, Path]):
    """Tensor name -> the shard holding it. Names are the sub-model's own (``model.layers.0...``): in a flat
    checkpoint the stored names carry ``prefix`` (``llm.model.layers.0...``), which :func:`read_tensors` adds back."""

    def __init__(self, items: Mapping[str, Path] | None = None, prefix: str = "",
                 stored: Mapping[str, str] | None = None) -> None:
        super().__init__(items or {})
        self.prefix = prefix
        self._stored = dict(stored or {})

    def stored_name(self, key: str) -> str:
        """The name the file gives tensor ``key``."""
        return self._stored.get(key) or self.prefix + key

    def renamed(self, rename: Callable[[str], str]) -> KeyMap:
        """The same tensors under the names ``rename`` gives them (reads still use the stored names)."""
        return KeyMap({rename(k): f for k, f in self.items()}, self.prefix,
                      {rename(k): self.stored_name(k) for k in self})


def safetensors_key_map(folder: str | os.PathLike | Part, validate: bool = True, prefix: str = "") -> KeyMap:
    """Map every tensor name in a folder (or a :class:`Part` of one) to the file that holds it, validating each
    file. With ``prefix`` only names that start with it are kept, without it."""
    if isinstance(folder, Part):
        folder, prefix = folder.folder, folder.prefix
    out = KeyMap(prefix=prefix)
    for f in list_weight_files(folder):
        keys = validate_safetensors(f).keys() if validate else safe_open(str(f), "pt").keys()
        for k in keys:
            if not k.startswith(prefix):
                continue
            name = k[len(prefix):]
            if name in out:
                raise CheckpointError(f"tensor {k!r} appears in both {out[name].name} and {f.name} in {folder}")
            out[name] = f
    return out


def tensor_shapes(key_map: KeyMap, keys: Iterable[str] | None = None) -> dict[str, tuple[int, ...]]:
    """The stored shape of each tensor in ``key_map`` (or of ``keys``): headers only, no tensor data is read."""
    by_file: dict[Path, list[str]] = {}
    for k in key_map if keys is None else keys:
        by_file.setdefault(key_map[k], []).append(k)
    out: dict[str, tuple[int, ...]] = {}
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt") as h:
            for k in names:
                out[k] = tuple(h.get_slice(key_map.stored_name(k)).get_shape())
    return out


def load_state_dict(
    folder: str | os.PathLike | Part,
    keys: Iterable[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Load tensors from a folder's safetensors files (all, or only ``keys``).

    Floating tensors are cast to ``dtype`` when given; integer tensors keep theirs. A :class:`Part` reads its
    sub-model's tensors, named without the part's prefix.
    """
    key_map = safetensors_key_map(folder)
    wanted = list(key_map) if keys is None else list(keys)
    missing = [k for k in wanted if k not in key_map]
    if missing:
        names = [key_map.stored_name(k) for k in missing[:5]]
        raise CheckpointError(f"{folder} lacks tensors {names}{' ...' if len(missing) > 5 else ''}")
    return read_tensors(key_map, wanted, dtype, device)


def read_tensors(
    key_map: Mapping[str, Path], keys: Iterable[str], dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` from the shards ``key_map`` names (each shard opened once), in the order given;
    floating tensors cast to ``dtype`` when given."""
    stored = key_map.stored_name if isinstance(key_map, KeyMap) else (lambda k: k)
    keys = list(keys)
    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(key_map[k], []).append(k)
    loaded: dict[str, torch.Tensor] = {}
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt", device=str(device)) as h:
            for k in names:
                t = h.get_tensor(stored(k))
                loaded[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return {k: loaded[k] for k in keys}


@dataclass(frozen=True)
class Part:
    """The files of one sub-model (``llm``, ``vision_tower``, ``mm_projector``) of a checkpoint.

    Three-folder layout: a folder of its own (``prefix`` ""), its ``config.json`` and side files (tokenizer,
    preprocessor) inside. Flat "-hf" layout: the tensors named ``<prefix>...`` in the root's shards, ``config`` the
    sub-config the root ``config.json`` embeds, side files at the root.
    """

    folder: Path
    prefix: str = ""
    config: dict | None = field(default=None, compare=False)  # None: read folder/config.json
    name: str = ""

    @property
    def flat(self) -> bool:
        return bool(self.prefix)

    def read_config(self) -> dict:
        return dict(self.config) if self.config is not None else read_json(self.folder / "config.json")

    def key_map(self, validate: bool = True) -> KeyMap:
        return safetensors_key_map(self, validate=validate)

    def weight_files(self) -> list[Path]:
        """The shards holding this part's tensors."""
        return sorted(set(self.key_map(validate=False).values())) if self.prefix else list_weight_files(self.folder)

    def weight_bytes(self) -> int:
        """Bytes of this part's tensor data (headers excluded: the same in either layout)."""
        total = 0
        for f in self.weight_files():
            for k, info in validate_safetensors(f).items():
                if k.startswith(self.prefix):
                    total += info["data_offsets"][1] - info["data_offsets"][0]
        return total

    def __str__(self) -> str:
        return f"{self.folder} ({self.prefix}*)" if self.prefix else str(self.folder)


def as_part(source: str | os.PathLike | Part) -> Part:
    """A folder path as the :class:`Part` it holds (a Part is returned as is)."""
    return source if isinstance(source, Part) else Part(Path(source))


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    folder: str | os.PathLike,
    max_shard_bytes: int = 5 * 1024**3,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write tensors as HF-style safetensors: one ``model.safetensors`` or shards plus an index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t.detach().contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        path = folder / SINGLE_NAME
        save_file(shards[0], str(path), metadata=meta)
        return [path]
    paths, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=meta)
        paths.append(folder / name)
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return paths


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early when ``path`` exists (without ``overwrite``) or cannot be created (a file on the way, no write
    permission): its nearest existing ancestor must be a folder this process can create a file in."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output folder {path} already exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output path {path} exists and is not a folder")
    probe = path.absolute().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputExistsError(f"cannot create {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK):
        raise OutputExistsError(f"cannot write to {probe}: permission denied")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise OutputExistsError(f"cannot write to {probe}: {e.strerror or e}") from e
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``path`` only when the block succeeds.

    An existing ``path`` is refused without ``overwrite``; with it, the old folder is removed only
    after the new one is complete. On error the temporary folder is deleted and ``path`` is untouched.
    """
    path = check_output_dir(path, overwrite).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
