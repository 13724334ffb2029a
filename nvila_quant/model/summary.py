"""A checkpoint's layout, parameter counts, dtypes and quantization status, read from headers only."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from nvila_quant.io import Part, validate_safetensors
from nvila_quant.model.config import SUBMODELS, NVILAConfig

__all__ = ["describe_checkpoint", "format_description"]

_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _part_summary(part: Part) -> dict[str, Any]:
    files = part.weight_files()
    dtypes: Counter[str] = Counter()
    n_tensors = n_elems = 0
    for f in files:
        header = validate_safetensors(f)
        for name, info in header.items():
            if not name.startswith(part.prefix):
                continue
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
            dtypes[info["dtype"]] += numel
            n_tensors += 1
            n_elems += numel
    cfg = part.read_config() if part.config is not None or (part.folder / "config.json").is_file() else {}
    return {
        "folder": f"{part.prefix}*" if part.flat else part.folder.name,
        "files": [f.name for f in files],
        "bytes": part.weight_bytes(),
        "tensors": n_tensors,
        "stored_elements": n_elems,
        "dtypes": dict(dtypes),
        "quantization_config": cfg.get("quantization_config"),
        "model_type": cfg.get("model_type") or cfg.get("mm_projector_type"),
    }


def describe_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Summarize an NVILA folder without loading weights (headers and configs only)."""
    config = NVILAConfig.from_pretrained(path)
    out: dict[str, Any] = {
        "path": str(Path(path).absolute()),
        "layout": config.layout,
        "model_type": (config.hf_config or {}).get("model_type", config.model_type),
        "architectures": (config.hf_config or {}).get("architectures", config.architectures),
        "image_aspect_ratio": config.image_aspect_ratio,
        "s2_scales": config.s2_scales if config.is_dynamic_s2 else None,
        "model_dtype": config.model_dtype,
        "hidden_size": config.hidden_size,
        "mm_hidden_size": config.mm_hidden_size,
        "projector_type": (config.mm_projector_cfg or {}).get("mm_projector_type"),
        "submodels": {},
    }
    for name in SUBMODELS:
        out["submodels"][name] = _part_summary(config.part(name))
    out["total_bytes"] = sum(s["bytes"] for s in out["submodels"].values())
    q = {k: bool(v["quantization_config"]) for k, v in out["submodels"].items()}
    out["quantized"] = q
    return out


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def format_description(d: dict[str, Any]) -> str:
    lines = [
        f"NVILA checkpoint {d['path']} ({'flat -hf' if d.get('layout') == 'hf' else 'three-folder'} layout)",
        f"  type {d['model_type']} {d['architectures']}, image_aspect_ratio={d['image_aspect_ratio']}"
        + (f", s2_scales={d['s2_scales']}" if d["s2_scales"] else ""),
        f"  hidden_size={d['hidden_size']} mm_hidden_size={d['mm_hidden_size']} projector={d['projector_type']} "
        f"model_dtype={d['model_dtype']}",
        "",
        f"  {'sub-model':<13} {'files':>5} {'tensors':>8} {'elements':>14} {'size':>10}  dtypes / quantization",
    ]
    for name, s in d["submodels"].items():
        dt = ", ".join(f"{k}:{v:,}" for k, v in sorted(s["dtypes"].items()))
        qc = s["quantization_config"]
        qs = "float" if not qc else (
            f"{qc.get('quant_method')} {qc.get('bits', qc.get('w_bit', '?'))}-bit "
            f"g{qc.get('group_size', qc.get('q_group_size', '?'))}"
            if qc.get("quant_method") != "compressed-tensors" else "compressed-tensors pack-quantized"
        )
        lines.append(
            f"  {name + ('' if d.get('layout') == 'hf' else '/'):<13} {len(s['files']):>5} {s['tensors']:>8} "
            f"{s['stored_elements']:>14,} "
            f"{_human(s['bytes']):>10}  {dt}; {qs}"
        )
    lines.append(f"  {'total':<13} {'':>5} {'':>8} {'':>14} {_human(d['total_bytes']):>10}")
    return "\n".join(lines)
