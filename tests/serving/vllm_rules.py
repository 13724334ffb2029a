"""Oracle of vLLM loading ``OUT/llm`` as a plain ``Qwen2ForCausalLM`` folder (vLLM has no NVILA class).

``check_vllm_llm_folder`` returns the reasons vLLM would refuse the folder or serve it below the intended path
(awq_marlin on every quantized linear); an empty list means it loads as intended. Facts (read, not copied) from
vllm-project/vllm:
- ``vllm/config/model.py::_verify_quantization`` / ``_parse_quant_hf_config``: ``quantization_config``, then
  ``compression_config``, then the same two keys of ``text_config``; ``quant_method`` lower-cased,
  ``compressed_tensors`` -> ``compressed-tensors``; override methods (``awq_marlin`` among them) are tried before
  the plain method; ``verify_with_parallel_config``: attention heads % tp.
- ``layers/quantization/awq_marlin.py``: ``AWQMarlinConfig.from_config`` (``lm_head`` default False,
  ``modules_to_not_convert``), ``get_quant_method`` (LinearBase, or ParallelLMHead only when ``lm_head`` is true;
  skip by substring; per-layer fallback to plain AWQ), ``maybe_update_config`` (an empty list is rebuilt from the
  safetensors dtypes: layers whose tensors are all fp16/bf16/fp32 stay unquantized).
- ``layers/quantization/awq.py``: plain AWQ takes fp16 activations only, sm75+, 4 bits; K per partition % group.
- ``layers/quantization/utils/quant_utils.py::is_layer_skipped``: fused ``qkv_proj`` / ``gate_up_proj`` are
  checked per shard and all shards must agree (else ValueError).
- ``layers/quantization/compressed_tensors/utils.py::should_ignore_layer``: ``ignore`` entries match a layer
  name exactly or, prefixed ``re:``, as a regex; shards of a fused layer must agree.
- ``layers/linear.py``: QKVParallelLinear splits heads over tp and replicates kv heads when tp > kv heads;
  MergedColumnParallelLinear / ColumnParallelLinear split N; RowParallelLinear (o_proj, down_proj) splits K.
- ``models/qwen2.py::Qwen2ForCausalLM.load_weights``: stacked mapping q/k/v -> qkv_proj, gate/up -> gate_up_proj;
  ``rotary_emb.inv_freq`` skipped, ``lm_head.weight`` skipped when embeddings are tied, an extra ``.bias`` that
  the model lacks is skipped, any other unknown name is a KeyError; weights not loaded raise at the end.
- ``model_loader/weight_utils.py::filter_duplicate_safetensors_files``: with an index file, only the shards its
  weight_map names are read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors import safe_open
from serving.marlin import MIN_SM, config_reasons, layer_reasons

__all__ = ["AWQ_PARAMS", "CT_PARAMS", "check_vllm_llm_folder", "detect_quant_config", "expected_layers"]

AWQ_PARAMS = ("qweight", "qzeros", "scales")
CT_PARAMS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
FLOAT_DTYPES = {"F16", "BF16", "F32"}


def detect_quant_config(config: dict) -> tuple[dict | None, str]:
    """(quantization dict, where it was found) in vLLM's order; (None, "") when there is none."""
    for where, cfg in (("", config), ("text_config.", config.get("text_config") or {})):
        for key in ("quantization_config", "compression_config"):
            if cfg.get(key) is not None:
                return cfg[key], where + key
    return None, ""


def _method(qc: dict) -> str:
    return str(qc.get("quant_method", "")).lower().replace("compressed_tensors", "compressed-tensors")


def expected_layers(config: dict) -> dict[str, dict[str, tuple[int, int]]]:
    """vLLM layer name -> {checkpoint shard name: full (N, K)} for every linear of Qwen2ForCausalLM."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    layers = {}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        layers[f"{p}.self_attn.qkv_proj"] = {f"{p}.self_attn.q_proj": (heads * head_dim, hidden),
                                             f"{p}.self_attn.k_proj": (kv * head_dim, hidden),
                                             f"{p}.self_attn.v_proj": (kv * head_dim, hidden)}
        layers[f"{p}.self_attn.o_proj"] = {f"{p}.self_attn.o_proj": (hidden, heads * head_dim)}
        layers[f"{p}.mlp.gate_up_proj"] = {f"{p}.mlp.gate_proj": (inter, hidden), f"{p}.mlp.up_proj": (inter, hidden)}
        layers[f"{p}.mlp.down_proj"] = {f"{p}.mlp.down_proj": (hidden, inter)}
    layers["lm_head"] = {"lm_head": (config["vocab_size"], hidden)}
    return layers


def _read_tensors(llm_dir: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor vLLM reads -> (safetensors dtype, shape), from the headers only.

    With ``model.safetensors.index.json`` present only the files its weight_map names are read, as vLLM does."""
    files = sorted(llm_dir.glob("*.safetensors"))
    index = llm_dir / "model.safetensors.index.json"
    if index.is_file():
        listed = set(json.loads(index.read_text())["weight_map"].values())
        files = [f for f in files if f.name in listed]
    out = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                sl = f.get_slice(name)
                out[name] = (sl.get_dtype(), tuple(sl.get_shape()))
    return out


def _awq_skip_list(qc: dict, tensors: dict) -> list[str]:
    """``modules_to_not_convert`` as vLLM ends up using it (``maybe_update_config`` when empty)."""
    listed = qc.get("modules_to_not_convert") or []
    if listed:
        return list(listed)
    layers = {name.rsplit(".", 1)[0] for name in tensors}
    quantized = {name.rsplit(".", 1)[0] for name, (dtype, _) in tensors.items() if dtype not in FLOAT_DTYPES}
    return sorted(layers - quantized)


def _ct_ignored(name: str, ignore: list[str]) -> bool:
    return any(re.match(entry[3:], name) if entry.startswith("re:") else entry == name for entry in ignore)


def _shard_skipped(method: str, qc: dict, skip: list[str], shard: str) -> bool:
    if method == "awq":
        return any(entry in shard for entry in skip)
    return _ct_ignored(shard, qc.get("ignore") or [])


def _partition_shape(layer: str, shards: dict[str, tuple[int, int]], config: dict, tp: int) -> tuple[int, int]:
    """Full (N, K) whose N / tp is vLLM's output_size_per_partition (kv heads replicated when tp > kv heads)."""
    n = sum(s[0] for s in shards.values())
    k = next(iter(shards.values()))[1]
    if layer.endswith("qkv_proj") and tp > 1:
        heads = config["num_attention_heads"]
        kv = config.get("num_key_value_heads") or heads
        head_dim = n // (heads + 2 * kv)
        kv_part = max(1, kv // tp)
        n = (heads // tp + 2 * kv_part) * head_dim * tp
    return n, k


def _side_file_problems(llm_dir: Path) -> list[str]:
    problems = []
    if not (llm_dir / "tokenizer.json").is_file() and not all(
            (llm_dir / f).is_file() for f in ("vocab.json", "merges.txt")):
        problems.append("no tokenizer: tokenizer.json (or vocab.json + merges.txt) missing")
    tok_cfg = {}
    if (llm_dir / "tokenizer_config.json").is_file():
        tok_cfg = json.loads((llm_dir / "tokenizer_config.json").read_text())
    else:
        problems.append("tokenizer_config.json missing")
    has_template = any((llm_dir / f).is_file() for f in ("chat_template.jinja", "chat_template.json"))
    if not (has_template or tok_cfg.get("chat_template")):
        problems.append("no chat template (chat_template.jinja / .json or tokenizer_config.json's chat_template): "
                        "vLLM's chat endpoint would refuse requests")
    gen = llm_dir / "generation_config.json"
    if not gen.is_file():
        problems.append("generation_config.json missing (vLLM takes default sampling settings from it)")
    else:
        try:
            json.loads(gen.read_text())
        except json.JSONDecodeError as e:
            problems.append(f"generation_config.json is not valid JSON: {e}")
    return problems


def _method_problems(method: str, qc: dict, config: dict, sm: int) -> tuple[list[str], bool]:
    """(checkpoint-level problems, whether awq_marlin is chosen)."""
    if method == "awq":
        reasons = config_reasons(qc, sm=sm, min_sm=MIN_SM["vllm"])
        if not reasons:
            return [], True
        problems = [f"not awq_marlin ({r})" for r in reasons]
        bits = qc.get("w_bit", qc.get("bits"))
        if bits != 4:
            problems.append(f"plain awq takes 4-bit weights only, got bits={bits}")
        if sm < 75:
            problems.append(f"plain awq needs sm75+, got sm{sm}")
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
        if dtype not in ("float16", "half"):
            problems.append(f"plain awq runs fp16 activations only; config dtype is {dtype or 'unset'} "
                            "(vLLM refuses it unless --dtype float16)")
        return problems, False
    if method == "compressed-tensors":
        problems = []
        if qc.get("format") != "pack-quantized":
            problems.append(f"compressed-tensors format {qc.get('format')!r}, expected 'pack-quantized'")
        for name, group in (qc.get("config_groups") or {}).items():
            w = group.get("weights") or {}
            if (w.get("num_bits"), w.get("type")) not in ((4, "int"), (8, "int")):
                problems.append(f"{name}: weights num_bits={w.get('num_bits')} type={w.get('type')}: not W4A16/W8A16")
            if group.get("input_activations") is not None:
                problems.append(f"{name}: quantized input activations: not a weight-only (WNA16) scheme")
        if not qc.get("config_groups"):
            problems.append("compressed-tensors config without config_groups")
        return problems, False
    return [f"quant_method {method!r}: this oracle knows awq and compressed-tensors only"], False


def _layer_problems(method: str, qc: dict, config: dict, tensors: dict, marlin: bool, tp: int) -> list[str]:
    problems = []
    params = AWQ_PARAMS if method == "awq" else CT_PARAMS
    skip = _awq_skip_list(qc, tensors) if method == "awq" else []
    lm_head_quantized = method == "awq" and bool(qc.get("lm_head", False))
    tied = bool(config.get("tie_word_embeddings", False))
    group_size = qc.get("group_size", qc.get("q_group_size"))
    expected: set[str] = {"model.embed_tokens.weight", "model.norm.weight"}
    fell_back = False
    for i in range(config["num_hidden_layers"]):
        expected |= {f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"}
    for layer, shards in expected_layers(config).items():
        if layer == "lm_head" and tied:
            continue
        # ParallelLMHead is not a LinearBase: quantized only by awq(_marlin) with "lm_head": true
        quantizable = lm_head_quantized if layer == "lm_head" else True
        skipped = {shard: _shard_skipped(method, qc, skip, shard) for shard in shards}
        if len(set(skipped.values())) > 1:
            problems.append(f"{layer}: shards {skipped} disagree on being skipped (vLLM raises ValueError)")
            continue
        quantized = quantizable and not next(iter(skipped.values()))
        for shard, (n, k) in shards.items():
            stored_q = f"{shard}.{params[0]}" in tensors
            if quantized != stored_q:
                expected |= {name for name in tensors if name.rsplit(".", 1)[0] == shard}  # reported here, once
            if quantized and not stored_q:
                problems.append(f"{shard}: vLLM builds it quantized but the checkpoint has no {shard}.{params[0]}")
                continue
            if not quantized and stored_q:
                why = "lm_head is quantized only with \"lm_head\": true" if layer == "lm_head" else "it is skipped"
                problems.append(f"{shard}: stored quantized but vLLM builds it unquantized ({why}): "
                                f"{shard}.{params[0]} is an unknown weight")
                continue
            names = [f"{shard}.{p}" for p in params] if quantized else [f"{shard}.weight"]
            missing = [name for name in names if name not in tensors]
            if missing:
                problems.append(f"{shard}: weights {missing} missing (vLLM: not initialized from checkpoint)")
                continue
            expected |= set(names)
            shape = tensors[names[0]][1]
            want = (k, n // 8) if quantized and method == "awq" else (n, k // 8) if quantized else (n, k)
            if shape != want:
                problems.append(f"{names[0]}: shape {shape}, config gives {want}")
            if method == "awq" and quantized and isinstance(group_size, int) and group_size > 0:
                scales = tensors[f"{shard}.scales"][1]
                if scales != (k // group_size, n):
                    problems.append(f"{shard}.scales: shape {scales}, expected {(k // group_size, n)} "
                                    f"for group_size {group_size}")
            if layer.startswith("model.layers.") and layer.endswith("qkv_proj"):
                expected.add(f"{shard}.bias")
        if quantized and method == "awq" and marlin:
            n, k = _partition_shape(layer, shards, config, tp)
            fallbacks = layer_reasons(layer, (n, k), group_size, tp)
            problems += fallbacks
            fell_back = fell_back or bool(fallbacks)
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
    if fell_back and dtype not in ("float16", "half"):
        problems.append(f"the plain awq fallback declares fp16 activations only; the model dtype is {dtype or 'unset'}")
    for name in sorted(tensors):
        if name in expected or name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        if name.endswith(".bias"):
            continue  # vLLM skips an extra bias the model lacks
        problems.append(f"{name}: not a weight of vLLM's Qwen2ForCausalLM (KeyError at load)")
    return problems


def check_vllm_llm_folder(llm_dir: Path, *, sm: int = 80, tp: int = 1) -> list[str]:
    """Reasons vLLM would not serve ``llm_dir`` as a Qwen2ForCausalLM on awq_marlin / compressed-tensors WNA16.

    ``sm``: the GPU's compute capability (80 = A100, 90 = H100); ``tp``: tensor-parallel size.
    """
    llm_dir = Path(llm_dir)
    if not (llm_dir / "config.json").is_file():
        return [f"{llm_dir}: no config.json"]
    config = json.loads((llm_dir / "config.json").read_text())
    problems = []
    if "Qwen2ForCausalLM" not in (config.get("architectures") or []):
        problems.append(f"architectures {config.get('architectures')} lack Qwen2ForCausalLM")
    heads = config.get("num_attention_heads", 0)
    if heads % tp:
        problems.append(f"num_attention_heads {heads} not divisible by tensor parallel size {tp}")
    kv = config.get("num_key_value_heads") or heads
    if tp > 1 and (kv % tp if kv >= tp else tp % kv):
        problems.append(f"num_key_value_heads {kv} and tensor parallel size {tp} do not divide one another")
    qc, _ = detect_quant_config(config)
    tensors = _read_tensors(llm_dir)
    if not tensors:
        problems.append("no *.safetensors weights")
    if qc is None:
        problems.append("no quantization_config / compression_config: vLLM would build float layers")
        return problems + _side_file_problems(llm_dir)
    method = _method(qc)
    method_problems, marlin = _method_problems(method, qc, config, sm)
    problems += method_problems
    if method in ("awq", "compressed-tensors") and tensors:
        problems += _layer_problems(method, qc, config, tensors, marlin, tp)
    return problems + _side_file_problems(llm_dir)
