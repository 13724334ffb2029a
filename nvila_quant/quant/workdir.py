"""The work folder ``<output>.work`` of a run: what ``--resume`` continues from.

    manifest.json               settings fingerprint (a resume with other settings is refused)
    calibration.safetensors     embedded samples + vision-tower outputs (the vision tower never runs again)
    projector.safetensors       the projector's result
    hidden.safetensors          inputs of the next LLM block (metadata: next_block)
    blocks/block_<i>.safetensors  each finished LLM block's result
    lm_head.safetensors         the output head's result (``quantize_lm_head``), after the last block
Every file is written under a temporary name and renamed, so a killed run leaves no half-written file.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nvila_quant.errors import ConfigError, OutputExistsError
from nvila_quant.io import read_json, write_json

__all__ = ["WorkDir", "work_dir_for"]

logger = logging.getLogger(__name__)


def work_dir_for(output: str | os.PathLike) -> Path:
    output = Path(output).absolute()
    return output.parent / f"{output.name}.work"


class WorkDir:
    """``<output>.work``: manifest, calibration cache, projector result, hidden states, block results."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.blocks = path / "blocks"

    def start(self, fingerprint: dict, resume: bool, overwrite: bool) -> int | None:
        """Create (or, with ``resume``, validate) the folder. Returns the next LLM block to run, or None."""
        manifest = self.path / "manifest.json"
        if self.path.exists() and not resume:
            if not overwrite:
                raise OutputExistsError(
                    f"found the work folder of an unfinished run at {self.path}; pass --resume to continue it or "
                    "--overwrite to start over"
                )
            shutil.rmtree(self.path)
        if resume and self.path.exists():
            old = read_json(manifest)["fingerprint"] if manifest.is_file() else {}
            diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            if diff:
                raise ConfigError(
                    f"cannot resume from {self.path}: it was made with different {', '.join(diff)}; "
                    "use the same settings, or start over with --overwrite"
                )
            return self.next_block()
        if resume:
            logger.warning("--resume: no work folder at %s; starting from the beginning", self.path)
        self.blocks.mkdir(parents=True, exist_ok=True)
        write_json(manifest, {"fingerprint": fingerprint, "created": time.strftime("%Y-%m-%d %H:%M:%S")})
        return None

    def block_path(self, i: int) -> Path:
        return self.blocks / f"block_{i:05d}.safetensors"

    @property
    def calib_path(self) -> Path:
        return self.path / "calibration.safetensors"

    @property
    def projector_path(self) -> Path:
        return self.path / "projector.safetensors"

    @property
    def head_path(self) -> Path:
        return self.path / "lm_head.safetensors"

    @property
    def vision_path(self) -> Path:
        """The W8A8 vision tower's finished ``vision_tower/`` folder (renamed into place when complete)."""
        return self.path / "vision_tower"

    @property
    def hidden_path(self) -> Path:
        return self.path / "hidden.safetensors"

    def next_block(self) -> int | None:
        if not self.hidden_path.is_file():
            return None
        with safe_open(str(self.hidden_path), framework="pt") as f:
            return int(f.metadata()["next_block"])

    def save_hidden(self, hidden: Sequence[torch.Tensor], next_block: int) -> None:
        tmp = Path(f"{self.hidden_path}.tmp")
        save_file({str(i): h.contiguous().cpu() for i, h in enumerate(hidden)}, str(tmp),
                  metadata={"next_block": str(next_block)})
        os.replace(tmp, self.hidden_path)

    def load_hidden(self, device: torch.device) -> list[torch.Tensor]:
        with safe_open(str(self.hidden_path), framework="pt", device=str(device)) as f:
            return [f.get_tensor(str(i)) for i in range(len(f.keys()))]
