"""``nvila-quant convert``: one NVILA checkpoint, float or quantized, in the layout each engine loads.

    --to hf       flat "-hf" (SGLang: ``python -m sglang.launch_server --model-path OUT --trust-remote-code``)
    --to vila     three folders (this runtime, VILA; ``OUT/llm`` alone is what vLLM serves)
    --to trtllm   three folders + ModelOpt W4A16_AWQ (TensorRT-LLM's ``quickstart_multimodal.py --model_type vila``)

A pure repack: int4 codes are carried over bit exactly where the target format can express them, and refused with
the reason (and the command that makes a checkpoint it can take) before any file is written where it cannot.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from nvila_quant.errors import ConfigError
from nvila_quant.export.trtllm import check_trtllm, write_trtllm
from nvila_quant.formats.checkpoint import read_quantized_submodel
from nvila_quant.io import atomic_output_dir, check_output_dir
from nvila_quant.model.config import NVILAConfig, load_config, stock_geometry_differences
from nvila_quant.model.layout import FLAT_FORMATS, check_flat_quantization, write_hf, write_vila
from nvila_quant.model.quantized import is_quantized

__all__ = ["TARGETS", "convert", "preflight"]

logger = logging.getLogger(__name__)

TARGETS = ("hf", "vila", "trtllm")


def preflight(config: NVILAConfig, to: str, fmt: str | None = None) -> list[str]:
    """Everything that can refuse the conversion, from configs and headers only (ConfigError); returns warnings."""
    if to not in TARGETS:
        raise ConfigError(f"unknown --to {to!r}; expected one of {', '.join(TARGETS)}")
    if fmt is not None and to != "hf":
        raise ConfigError(f"--format chooses the LLM's int4 format of the flat -hf layout; --to {to} keeps or sets "
                          "its own")
    warnings = []
    llm = config.part("llm")
    if to == "hf":
        if fmt is not None and fmt not in FLAT_FORMATS:
            raise ConfigError(f"--to hf carries the LLM as {' or '.join(FLAT_FORMATS)} (what SGLang loads), "
                              f"not {fmt}")
        if is_quantized(llm):
            _, qlinears, spec = read_quantized_submodel(llm, lazy=True)
            target = fmt or (spec.format if spec.format in FLAT_FORMATS else "autoawq")
            check_flat_quantization(spec, list(qlinears), target)
        elif fmt is not None:
            raise ConfigError(f"--format {fmt} applies to a quantized checkpoint; {config.root} is float")
        off = stock_geometry_differences(config)
        if off:
            warnings.append(
                f"this {config.variant} checkpoint's geometry is not the one SGLang hard-codes for model_type "
                f"{config.variant!r} ({'; '.join(off)}): SGLang would mis-serve it (our runtime reads the geometry "
                "from config.json)"
            )
    if to == "trtllm":
        check_trtllm(llm)
    return warnings


def convert(model: str | os.PathLike, output: str | os.PathLike, to: str, *, fmt: str | None = None,
            overwrite: bool = False, progress: bool = True) -> dict:
    """Write the checkpoint ``model`` (either layout) as ``to`` in ``output`` (atomic). Returns the manifest."""
    if to not in TARGETS:
        raise ConfigError(f"unknown --to {to!r}; expected one of {', '.join(TARGETS)}")
    check_output_dir(output, overwrite)
    config = load_config(model)
    if Path(output).absolute() == Path(model).absolute():
        raise ConfigError("--output must differ from --model")
    for warning in preflight(config, to, fmt):
        logger.warning("%s", warning)
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        if to == "hf":
            manifest = write_hf(config, tmp, fmt=fmt, progress=progress)
        elif to == "vila":
            manifest = write_vila(config, tmp, progress=progress)
        elif config.layout == "vila":
            manifest = write_trtllm(config.root, tmp, progress=progress)
        else:  # TRT-LLM's layout is built from the three folders: stage them beside the output
            stage = Path(tempfile.mkdtemp(prefix=f".{Path(output).name}.stage-", dir=tmp.parent))
            try:
                write_vila(config, stage, progress=progress)
                manifest = write_trtllm(stage, tmp, progress=progress)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
    return manifest
