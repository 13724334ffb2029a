"""Writing the quantized NVILA folder from a finished work folder (streamed, one block at a time).

    config.json                 root config (+ quantization_config summary; embedded sub-configs updated)
    llm/                        packed linears + float embeddings/norms/lm_head, tokenizer, config.json with
                                the format's quantization_config (a standard AWQ / compressed-tensors checkpoint);
                                with ``quantize_lm_head`` a packed lm_head, its scales folded into model.norm, and
                                embed_tokens grown with the head to its rows (vocab_size; tie_word_embeddings false)
    mm_projector/               packed linears + LayerNorms + activation scales (``scaled_activations``)
    vision_tower/               copied unchanged, or (target "vision_tower") W8A8 compressed-tensors int-quantized
    awq_results.safetensors     searched scales and clips (see :mod:`nvila_quant.quant.results`); in the flat -hf
                                layout ``quantization/awq_results.safetensors``
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from nvila_quant.formats.checkpoint import QuantizedCheckpointWriter
from nvila_quant.io import read_json, read_tensors
from nvila_quant.model.config import NVILAConfig
from nvila_quant.model.layout import materialize_part, write_side_files
from nvila_quant.model.llm import grow_rows
from nvila_quant.quant.config import AWQConfig
from nvila_quant.quant.lazy import LLMBlocks
from nvila_quant.quant.plan import LayerPlan
from nvila_quant.quant.results import AWQResultsWriter, load_block_result
from nvila_quant.quant.workdir import WorkDir

__all__ = ["write_output"]


def write_output(tmp: Path, output: Path, root: Path, nv_config: NVILAConfig, config: AWQConfig, plan: LayerPlan,
                  work: WorkDir, log: dict, progress: bool = True) -> dict:
    results = AWQResultsWriter()
    fmt_args = (config.format, config.bits, config.group_size, config.symmetric)
    summary: dict[str, Any] = {}
    # the three-folder root config (an -hf source's, rebuilt from its text/vision configs and geometry)
    root_cfg = json.loads((root / "config.json").read_text()) if nv_config.layout == "vila" else nv_config.to_dict()

    # llm/
    llm_src = nv_config.part("llm")
    if "llm" in config.targets:
        writer = QuantizedCheckpointWriter(tmp / "llm", *fmt_args)
        blocks = LLMBlocks.from_folder(llm_src)
        llm_cfg = llm_src.read_config()
        head = load_block_result(work.head_path) if plan.lm_head is not None else None
        for key in blocks.other_keys():
            if head is not None and (key == "lm_head.weight" or key in head.floats):
                continue  # written from the head's result below
            t = read_tensors(blocks.key_map, [key])[key]
            if head is not None and key == "model.embed_tokens.weight":  # (V_stored, H) -> (rows, H): the head's rows
                t = grow_rows(t, plan.lm_head_rows, t.dtype)
            writer.add_tensor(key, t)
        if head is not None:
            writer.add_linear("lm_head", head.qlinears["lm_head"])
            for key, t in head.floats.items():
                writer.add_tensor(key, t)
            llm_cfg.update(vocab_size=plan.lm_head_rows, tie_word_embeddings=False)
        block_logs = []
        for i in tqdm(range(blocks.num_layers), desc="writing llm", leave=False, disable=not progress):
            result = load_block_result(work.block_path(i))
            prefix = blocks.prefix(i)
            for name, qt in result.qlinears.items():
                writer.add_linear(prefix + name, qt)
            for key, t in result.floats.items():
                writer.add_tensor(prefix + key, t)
            results.add(f"llm.{prefix}", result)
            block_logs.append(result.log)
        if head is not None:
            results.add("llm.", head)
            log["lm_head"] = head.log
            summary["lm_head"] = {k: head.log.get(k) for k in ("mse_rtn", "mse_awq", "kl_rtn", "kl_awq")}
        floats = [f"model.layers.{i}.{n}" for i in range(blocks.num_layers) for n, q in plan.llm.items() if q is None]
        writer.finish(llm_cfg, modules_to_not_convert=[*([] if head is not None else ["lm_head"]), *floats])
        write_side_files(llm_src, tmp / "llm")
        log["blocks"] = block_logs
        summary.update(_block_summary(block_logs))
        root_cfg["llm_cfg"] = {**read_json(tmp / "llm" / "config.json"), "_name_or_path": "./llm"}
    else:
        materialize_part(llm_src, tmp / "llm", progress)

    # mm_projector/
    mp_src = nv_config.part("mm_projector")
    if "projector" in config.targets:
        result = load_block_result(work.projector_path)
        writer = QuantizedCheckpointWriter(tmp / "mm_projector", *fmt_args)
        for name, qt in result.qlinears.items():
            writer.add_linear(name, qt)
        for key, t in result.floats.items():
            writer.add_tensor(key, t)
        mp_cfg = mp_src.read_config()
        acts = sorted(k.removesuffix(".scales") for k in result.floats if k.endswith(".scales"))
        if acts:
            mp_cfg["scaled_activations"] = acts  # act(x) / <act>.scales (AutoAWQ's ScaledActivation)
        floats = [n for n, q in plan.projector.items() if q is None]
        writer.finish(mp_cfg, modules_to_not_convert=floats)
        write_side_files(mp_src, tmp / "mm_projector")
        results.add("mm_projector.", result)
        summary["projector"] = {k: result.log.get(k) for k in ("mse_rtn", "mse_awq")}
        root_cfg["mm_projector_cfg"] = {**read_json(tmp / "mm_projector" / "config.json"),
                                        "_name_or_path": "./mm_projector"}
    else:
        materialize_part(mp_src, tmp / "mm_projector", progress)

    # vision_tower/ (W8A8 or unchanged), root config, AWQ results
    if "vision_tower" in config.targets:
        shutil.copytree(work.vision_path, tmp / "vision_tower", ignore=shutil.ignore_patterns("vision_quant_log.json"))
        if "vision_tower_cfg" in root_cfg:
            root_cfg["vision_tower_cfg"] = {**read_json(tmp / "vision_tower" / "config.json"),
                                            "_name_or_path": "./vision_tower"}
        summary["vision_tower"] = {"quantized": len(log.get("vision_tower", {}).get("quantized", [])),
                                   "kept_float": len(log.get("vision_tower", {}).get("kept_float", []))}
    else:
        materialize_part(nv_config.part("vision_tower"), tmp / "vision_tower", progress)
    root_cfg["_name_or_path"] = str(output)
    root_cfg["quantization_config"] = {
        "quant_method": config.method, "format": config.format, "bits": config.bits,
        "group_size": config.group_size, "zero_point": config.zero_point, "targets": list(config.targets),
        "tool": "nvila-quant",
    }
    if "llm" in config.targets and plan.lm_head is not None:
        root_cfg["quantization_config"]["lm_head"] = True
    (tmp / "config.json").write_text(json.dumps(root_cfg, indent=2) + "\n")
    results.save(tmp / "awq_results.safetensors", {"method": config.method, "settings": config.to_dict()})
    return summary


def _block_summary(block_logs: list[dict]) -> dict:
    pairs = [(b["mse_rtn"], b["mse_awq"]) for b in block_logs if "mse_rtn" in b]
    if not pairs:
        return {}
    return {
        "blocks_mse_rtn": [r for r, _ in pairs],
        "blocks_mse_awq": [a for _, a in pairs],
        "blocks_awq_better": sum(a < r for r, a in pairs),
        "blocks": len(pairs),
    }
