"""The quantization pipeline: ``quantize(model, config, calib, output)``.

1. Check everything that can fail cheaply: settings, output folder, packability of every target linear
   (with per-layer group-size fallback), the calibration records and images.
2. Calibration through the real NVILA pipeline (vision tower run once; its outputs cached in the work
   folder), capturing the projector's inputs and block 0's inputs.
3. The projector (its own groups, calibrated on the vision features of the same samples).
4. The LLM block by block: each block's weights are read from the shards, searched, quantized and saved
   to the work folder with the next block's inputs, so peak memory does not grow with depth and
   ``resume=True`` continues after the last finished block; with ``quantize_lm_head`` the output head after them
   (:mod:`nvila_quant.quant.head`), saved in the work folder too.
5. The output folder, written as a temporary sibling and renamed only when complete.

The work folder is ``<output>.work`` (kept when a run fails; removed after success).
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nvila_quant.calibration import (
    CalibrationSet,
    CalibRecord,
    CalibSample,
    build_samples,
    check_images,
    embed_samples,
    load_records,
    replay,
)
from nvila_quant.errors import ConfigError
from nvila_quant.formats.checkpoint import QuantSpec
from nvila_quant.io import atomic_output_dir, check_output_dir, read_json, write_json
from nvila_quant.model import NVILAQwen2
from nvila_quant.model.config import LAYOUTS, NVILAConfig, load_config
from nvila_quant.model.layout import check_flat_quantization, write_hf
from nvila_quant.model.nvila import build_mm_projector
from nvila_quant.quant.awq import wrap_scaled_activations
from nvila_quant.quant.block import BlockInputs, BlockResult, effective_state, quantize_block
from nvila_quant.quant.config import AWQConfig, resolve_device, resolve_dtype
from nvila_quant.quant.head import quantize_head
from nvila_quant.quant.lazy import LLMBlocks, NVILAShell
from nvila_quant.quant.mappings import projector_groups, qwen2_block_groups
from nvila_quant.quant.output import write_output
from nvila_quant.quant.plan import LayerPlan, meta_projector, plan_layers
from nvila_quant.quant.results import load_block_result, save_block_result
from nvila_quant.quant.vision import VisionQuantConfig, quantize_tower, save_tower
from nvila_quant.quant.workdir import WorkDir, work_dir_for

__all__ = ["LayerPlan", "QuantizeResult", "plan_layers", "quantize", "work_dir_for"]

logger = logging.getLogger(__name__)

@dataclass
class QuantizeResult:
    output: Path
    log: dict


# ---------------------------------------------------------------------------------------------- pipeline
def _model_root(model: str | os.PathLike | NVILAQwen2) -> Path:
    if isinstance(model, NVILAQwen2):
        if model.config.root is None:
            raise ConfigError("the model has no checkpoint folder (config.root); pass the checkpoint path instead")
        return Path(model.config.root)
    return Path(model)


def _calibration(calib: Any, config: AWQConfig) -> tuple[list[CalibSample], dict]:
    if isinstance(calib, list | tuple) and calib and isinstance(calib[0], CalibSample):
        samples, source = list(calib), "python"
    else:
        records = list(calib) if isinstance(calib, list | tuple) else load_records(calib, config.n_samples, config.seed)
        if records and not isinstance(records[0], CalibRecord):
            raise ConfigError("calib must be a source name/path, CalibRecords or CalibSamples, "
                              f"got {type(records[0]).__name__}")
        samples = build_samples(records, config.n_samples, config.text_ratio, config.seed)
        source = calib if isinstance(calib, str | os.PathLike) else "python"
        chosen = {s.origin for s in samples}
        check_images([r for r in records if r.origin in chosen])
    n_image = sum(s.kind == "image" for s in samples)
    if "projector" in config.targets and config.method == "awq" and n_image == 0:
        raise ConfigError("AWQ of the projector needs image samples; lower --text-ratio or drop 'projector' "
                          "from --targets")
    if "vision_tower" in config.targets and n_image == 0:
        raise ConfigError("W8A8 of the vision tower needs image samples; lower --text-ratio or drop 'vision_tower' "
                          "from --targets")
    return samples, {"source": str(source), "samples": [f"{s.kind}:{s.origin}" for s in samples]}


def quantize(
    model: str | os.PathLike | NVILAQwen2,
    config: AWQConfig | None = None,
    calib: str | os.PathLike | Sequence[CalibRecord] | Sequence[CalibSample] | None = "builtin",
    output: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_block_done: Callable[[int], None] | None = None,
    layout: str | None = None,
) -> QuantizeResult:
    """Quantize an NVILA checkpoint folder (AWQ or RTN) and write the quantized NVILA folder ``output``.

    ``calib``: "builtin", "coco", a folder / ``.jsonl`` path, or records / samples (ignored by RTN when None).
    ``on_block_done(i)`` is called after LLM block i is saved to the work folder, and with ``quantize_lm_head`` after
    the output head as i = num_hidden_layers (progress reporting; an exception it raises stops the run there, as a
    crash would, and ``resume=True`` continues after block i).
    ``layout``: "vila" (three folders) or "hf" (flat, what SGLang serves); default: the input's.
    """
    t_start = time.perf_counter()
    config = config or AWQConfig()
    if output is None:
        raise ConfigError("quantize needs an output folder")
    output = check_output_dir(output, overwrite)
    root = _model_root(model)
    nv_config = load_config(root)
    layout = layout or nv_config.layout
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "hf" and "vision_tower" in config.targets:
        raise ConfigError("a W8A8 vision tower is written in the three-folder layout only (--layout vila); the flat "
                          "-hf layout's vision weights are not converted to int8 yet")
    device = resolve_device(config.device)
    run = _Run(root, nv_config, config, device, resolve_dtype(config.dtype, device, config.numerics), nv_config.dtype,
               plan_layers(nv_config, config), WorkDir(work_dir_for(output)), progress)
    for note in run.plan.notes:
        logger.warning("%s", note)
    samples, calib_info = None, {"source": None}
    if config.method == "awq" or calib is not None:
        samples, calib_info = _calibration(calib if calib is not None else "builtin", config)
    fingerprint = {
        "config": config.search_fingerprint(), "model": str(root.absolute()),
        "weights": nv_config.weights_fingerprint(),
        "calibration": calib_info, "compute_dtype": str(run.dtype), "save_dtype": str(run.save_dtype),
    }
    next_block = run.work.start(fingerprint, resume, overwrite)
    logger.info("work folder: %s (kept if the run stops; --resume continues from it)", run.work.path)
    run.log.update({
        "tool": "nvila-quant", "method": config.method, "settings": config.to_dict(), "model": str(root.absolute()),
        "device": str(device), "compute_dtype": str(run.dtype), "save_dtype": str(run.save_dtype),
        "torch": torch.__version__, "platform": platform.platform(), "layer_plan": run.plan.overrides(),
        "notes": run.plan.notes, "resumed_from_block": next_block if resume else None,
        "calibration": calib_info,
    })
    if samples is not None:
        if "vision_tower" in config.targets:
            run.vision_tower(samples)
        run.calibrate(samples, next_block)
    if "projector" in config.targets:
        run.projector(next_block)
    if "llm" in config.targets:
        hidden = run.llm(next_block, on_block_done)
        if run.plan.lm_head is not None:
            run.head(hidden, on_block_done)
    run.shell = run.calib = None  # free memory before writing
    t0 = time.perf_counter()
    if layout == "hf" and "llm" in config.targets:  # refuse what the flat layout cannot state, before long work
        quantized, overrides = _llm_modules(run.plan, nv_config, config.group_size)
        check_flat_quantization(QuantSpec(config.format, config.bits, config.group_size, not config.zero_point,
                                          overrides), quantized, config.format)
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        staged = tmp / ".three-folders" if layout == "hf" else tmp
        summary = write_output(staged, Path(output).absolute(), root, nv_config, config, run.plan, run.work,
                               run.log, progress)
        if layout == "hf":
            write_hf(load_config(staged), tmp, progress=progress,
                     carry_from=nv_config if nv_config.layout == "hf" else None)
            # not beside the weights: an engine without the shard index would take it for a weight file
            (tmp / "quantization").mkdir()
            os.replace(staged / "awq_results.safetensors", tmp / "quantization" / "awq_results.safetensors")
            shutil.rmtree(staged)
        run.timings.update(write_s=time.perf_counter() - t0, total_s=time.perf_counter() - t_start)
        run.log.update(timings=run.timings, summary=summary)
        write_json(tmp / "quant_log.json", run.log)
    shutil.rmtree(run.work.path, ignore_errors=True)
    return QuantizeResult(Path(output), run.log)


def _llm_modules(plan: LayerPlan, nv_config: NVILAConfig, group_size: int) -> tuple[list[str], dict[str, int]]:
    """The LLM modules the plan quantizes, and those with another group size than ``group_size``."""
    layers = int(nv_config.part("llm").read_config()["num_hidden_layers"])
    planned = [(f"model.layers.{i}.{name}", q) for i in range(layers) for name, q in plan.llm.items()]
    planned.append(("lm_head", plan.lm_head))
    quantized, overrides = [], {}
    for name, q in planned:
        if q is not None:
            quantized.append(name)
            if q.group_size != group_size:
                overrides[name] = q.group_size
    return quantized, overrides


@dataclass
class _Run:
    """State of one quantization run, stage by stage (calibrate -> projector -> llm)."""

    root: Path
    nv_config: NVILAConfig
    config: AWQConfig
    device: torch.device
    dtype: torch.dtype  # compute
    save_dtype: torch.dtype  # checkpoint
    plan: LayerPlan
    work: WorkDir
    progress: bool = True
    shell: NVILAShell | None = None
    calib: CalibrationSet | None = None
    log: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def calibrate(self, samples: list[CalibSample], next_block: int | None) -> None:
        """Vision tower + projector + embedding splice once (or the work folder's cache on resume)."""
        t0 = time.perf_counter()
        self.shell = NVILAShell.load_pretrained(self.root, torch_dtype=self.dtype, device=self.device)
        if self.work.calib_path.is_file():
            self.calib = CalibrationSet.load(self.work.calib_path, self.device)
            need_proj = "projector" in self.config.targets and not self.work.projector_path.is_file()
            if need_proj:  # re-capture the projector's inputs from the cached vision features
                self.calib = replay(self.shell, self.calib, capture_projector=True)
        else:
            self.calib = embed_samples(self.shell, samples, self.config.seqlen, progress=self.progress)
            self.calib.save(self.work.calib_path)
        self.shell.free_vision_tower()
        self.log["calibration"] = {**self.log.get("calibration", {}), **self.calib.summary()}
        self.timings["calibration_s"] = time.perf_counter() - t0

    def vision_tower(self, samples: list[CalibSample]) -> None:
        """W8A8 of the tower on a seeded subset of the image samples' tiles, saved to the work folder (the LLM and
        projector then calibrate on the float tower's features, as the reference's stages are independent)."""
        t0 = time.perf_counter()
        if self.work.vision_path.is_dir():
            self.log["vision_tower"] = read_json(self.work.vision_path / "vision_quant_log.json")
            return
        shell = NVILAShell.load_pretrained(self.root, torch_dtype=self.dtype, device=self.device)
        tiles = []
        for sample in samples:
            if sample.kind == "image":
                media, _ = shell.prepare_media(sample.fresh_conversation())
                tiles += list(media.get("image", []))
        keep = torch.randperm(len(tiles), generator=torch.Generator().manual_seed(self.config.seed))
        picked = torch.stack([tiles[i] for i in sorted(keep[: self.config.vision_tiles].tolist())])
        tower = shell.get_vision_tower()
        cfg = VisionQuantConfig(search_tokens=self.config.search_tokens or VisionQuantConfig.search_tokens,
                                max_error=self.config.vision_max_error, seed=self.config.seed)
        result = quantize_tower(tower, picked, cfg, progress=self.progress)
        result.log["tiles_available"] = len(tiles)
        staged = self.work.path / "vision_tower.partial"
        shutil.rmtree(staged, ignore_errors=True)
        save_tower(tower, result, self.nv_config.part("vision_tower"), staged, self.save_dtype)
        write_json(staged / "vision_quant_log.json", result.log)
        os.replace(staged, self.work.vision_path)
        self.log["vision_tower"] = result.log
        self.timings["vision_tower_s"] = time.perf_counter() - t0

    def projector(self, next_block: int | None) -> None:
        t0 = time.perf_counter()
        if self.work.projector_path.is_file():
            result = load_block_result(self.work.projector_path)
        else:
            result = _quantize_projector(self.root, self.nv_config, self.shell, self.calib, self.plan, self.config,
                                         self.dtype, self.save_dtype, self.device, self.progress)
            _log_block("projector", result.log)
            save_block_result(self.work.projector_path, result)
        self.log["projector"] = result.log
        if self.config.quant_input and self.shell is not None and next_block is None:
            _install_projector(self.shell, result, self.dtype)  # the LLM then sees the quantized projector
            self.calib = replay(self.shell, self.calib, capture_projector=False)
        self.timings["projector_s"] = time.perf_counter() - t0

    def llm(self, next_block: int | None, on_block_done: Callable[[int], None] | None) -> list[torch.Tensor] | None:
        """Every decoder block in turn: load from the shards, quantize, save result and next inputs. Returns the last
        block's outputs (None without calibration)."""
        t0 = time.perf_counter()
        blocks = LLMBlocks(self.nv_config.part("llm"), *_block_spec(self.shell, self.nv_config))
        groups = qwen2_block_groups(blocks.config, self.config.gqa_vo)
        hidden, block_kwargs = None, None
        if self.calib is not None:
            if next_block is None:
                hidden = [self.shell.block_inputs(h)[0] for h in self.calib.hidden()]
                self.work.save_hidden(hidden, 0)
                next_block = 0
            else:
                hidden = self.work.load_hidden(self.device)
            block_kwargs = [self.shell.block_inputs(h)[1] for h in hidden]
            self.calib = None
        start = next_block or 0
        for i in tqdm(range(start, blocks.num_layers), desc="LLM blocks", disable=not self.progress, initial=start,
                      total=blocks.num_layers):
            block = blocks.load(i, self.dtype, self.device)
            inputs = None if hidden is None else BlockInputs([(h,) for h in hidden], block_kwargs)
            result = quantize_block(block, inputs, groups, self.plan.llm, self.config, self.save_dtype, f"block {i}",
                                    self.progress)
            result.log["index"] = i
            _log_block(f"block {i}", result.log)
            save_block_result(self.work.block_path(i), result)
            if result.outputs is not None:
                hidden = result.outputs
                self.work.save_hidden(hidden, i + 1)
            del block, result
            if on_block_done is not None:
                on_block_done(i)
        self.timings["llm_s"] = time.perf_counter() - t0
        return hidden

    def head(self, hidden: list[torch.Tensor] | None, on_block_done: Callable[[int], None] | None) -> None:
        """The output head after the last block (or its saved result on resume)."""
        t0 = time.perf_counter()
        if self.work.head_path.is_file():
            result = load_block_result(self.work.head_path)
        else:
            blocks = LLMBlocks(self.nv_config.part("llm"), *_block_spec(self.shell, self.nv_config))
            head = blocks.load_head(self.plan.lm_head_rows, self.dtype, self.device)
            result = quantize_head(head, hidden, self.plan.lm_head, self.config, self.save_dtype, self.progress)
            del head
            _log_block("lm_head", result.log)
            save_block_result(self.work.head_path, result)
            if on_block_done is not None:
                on_block_done(blocks.num_layers)
        self.log["lm_head"] = result.log
        self.timings["lm_head_s"] = time.perf_counter() - t0


def _log_block(name: str, log: dict) -> None:
    """One line per block: output MSE of RTN vs the result, and each group's ratio and loss."""
    if "mse_rtn" not in log:
        return
    groups = ", ".join(f"{g['name']} r={g['ratio']:.2f} {g['rtn_loss']:.3g}->{g['awq_loss']:.3g}"
                       for g in log["groups"])
    logger.info("%s: output MSE RTN %.4g -> %.4g (%s) in %.1f s", name, log["mse_rtn"], log["mse_awq"],
                groups or "no scale groups", log["time_s"]["total"])


def _block_spec(shell: NVILAShell | None, nv_config: NVILAConfig):
    if shell is not None:
        return shell.block_class, shell.block_config
    probe = LLMBlocks.from_folder(nv_config.part("llm"))
    return probe.block_class, probe.config


def _load_projector(root: Path, nv_config: NVILAConfig, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    meta = meta_projector(nv_config)
    return build_mm_projector(nv_config.part("mm_projector"), nv_config, meta.mm_hidden_size,
                              meta.hidden_size, dtype, device)


def _quantize_projector(root, nv_config, shell, calib_set, plan, config, dtype, save_dtype, device,
                        progress: bool = True) -> BlockResult:
    source = shell.get_mm_projector() if shell is not None else _load_projector(root, nv_config, dtype, device)
    projector = copy.deepcopy(source)
    groups = projector_groups(projector) if config.method == "awq" else []
    wrap_scaled_activations(projector, [g.prev_op for g in groups if g.prev_kind == "act"])
    inputs = None
    if calib_set is not None:
        xs = calib_set.projector_inputs or []
        inputs = BlockInputs([(x,) for x in xs], [{} for _ in xs])
    return quantize_block(projector, inputs, groups, plan.projector, config, save_dtype, "projector", progress)


def _install_projector(shell: NVILAShell, result: BlockResult, dtype: torch.dtype) -> None:
    """Put the quantized (dequantized) projector into the shell, for quantized-input propagation."""
    projector = shell.get_mm_projector()
    wrap_scaled_activations(projector, [n.removesuffix(".scales") for n in result.floats if n.endswith(".scales")])
    state = {k: v.to(dtype) for k, v in projector.state_dict().items()}
    state.update({k: v.to(dtype) for k, v in result.floats.items()})
    save_dtype = next(iter(result.qlinears.values())).scale.dtype if result.qlinears else dtype
    projector.load_state_dict(effective_state(state, result.qlinears, save_dtype), strict=True)

