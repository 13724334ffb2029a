"""Independent oracle of SGLang's rules for loading a flat "-hf" NVILA / NVILA-Lite folder.

``check_sglang_checkpoint(root)`` returns the reasons SGLang would refuse (or silently mis-load) the folder; an empty
list means it loads. It reads only files (config.json, safetensors headers, tokenizer, remote code), never SGLang.

Facts (read, not copied) from sgl-project/sglang:
- ``configs/model_config.py``: the model class comes from ``architectures[0]``; both NVILA classes are in
  ``multimodal_model_archs``. ``_parse_quant_hf_config`` looks at the top-level ``quantization_config`` (a config
  without ``quant_method`` is taken for ModelOpt), then ``compression_config``, then ``hf_quant_config.json``
  (ModelOpt: FP8 / FP4 / MIXED_PRECISION only); never ``text_config``. ``_verify_quantization`` lets each method's
  ``override_quantization_method`` rewrite it. ``_get_and_verify_dtype`` takes the dtype of ``hf_text_config``
  (``text_config``); "auto" on float32 gives float16.
- ``models/nvila.py`` / ``models/nvila_lite.py``: ``load_weights`` strips ``llm.`` and hands the rest to
  ``Qwen2ForCausalLM.load_weights``; every other name is ``dict(self.named_parameters())[name]`` (KeyError when
  absent) and loaded with a shape-checking weight loader. ``vision_tower = SiglipVisionModel(vision_config)``;
  projector ``layers`` (NVILA: 1 LayerNorm(3456*4), 2 Linear(3456*4, H), 4 Linear(H, H); Lite: 1 LayerNorm(1152*9),
  2 Linear(1152*9, 1152*3), 4 LayerNorm(1152*3), 5 Linear(1152*3, H), 7 Linear(H, H)). Hard-coded: features
  ``hidden_states[-2]``, S2 scales [448, 896, 1344], ``resize_output_to_scale_idx=-1``. Only the LLM gets the
  quant config (prefix ``llm``), so vision tower and projector are plain float modules.
- ``models/qwen2.py`` ``load_weights``: skips ``rotary_emb.inv_freq``, names containing ``projector`` and (tied
  embeddings) ``lm_head.weight``; ``stacked_params_mapping`` q/k/v_proj -> qkv_proj, gate/up_proj -> gate_up_proj
  (substring replace); a ``.bias`` the model lacks is skipped; any other unknown name is a KeyError.
- ``layers/quantization/awq.py``: ``is_layer_skipped_awq`` = substring match of ``modules_to_not_convert`` in the
  layer prefix (``llm.model.layers.N.self_attn.qkv_proj`` ...); ``AWQConfig`` needs 4 bits and takes fp16 only;
  ``AWQMarlinConfig`` (sm80+, fp16 / bf16) quantizes ``ParallelLMHead`` only with ``"lm_head": true``; plain AWQ
  never quantizes the LM head (not a LinearBase). AWQ tensors: qweight (K, N/8) int32, qzeros (K/G, N/8) int32,
  scales (K/G, N). The awq -> awq_marlin conditions are in ``serving/marlin.py``.
- ``layers/quantization/compressed_tensors``: ``should_ignore_layer`` (substring / ``re:`` match of ``ignore``,
  the shards of a fused layer must agree), ``find_matched_target`` (layer name exact / ``re:``, then the module's
  class name by substring, then fused shards), WNA16 (sm80, marlin shapes, ``pack-quantized``, group or channel
  strategy; asymmetric accepted since sglang PR 25292): weight_packed (N, K/8) int32, weight_scale (N, K/G),
  weight_zero_point (N/8, K/G) int32 when asymmetric, weight_shape (2,) int64.
- ``multimodal/processors/nvila.py``: the processor's tokenizer must expose ``image_token`` / ``video_token``;
  ``MultimodalSpecialTokens`` takes the ids from ``hf_config.image_token_id`` / ``video_token_id``.
SGLang pins transformers 4.x (0.5.1: ``transformers==4.55.2``), where ``SiglipVisionModel`` keeps its
``vision_model`` level: names are ``vision_tower.vision_model.*``. transformers 5.x drops that level (its loader
renames on load; SGLang's direct lookup does not), so ``transformers_major=5`` checks the names that version needs.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.marlin import config_reasons, layer_reasons

__all__ = [
    "ARCHITECTURES",
    "Geometry",
    "check_sglang_checkpoint",
    "expected_llm_params",
    "parse_quant_config",
    "read_safetensors_headers",
]

ARCHITECTURES = {"NVILAForConditionalGeneration": "nvila", "NVILALiteForConditionalGeneration": "nvila_lite"}
STOCK_MM_HIDDEN = {"nvila": 3456, "nvila_lite": 1152}
STACKED = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
           ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
LINEAR_CLASS = {"qkv_proj": "QKVParallelLinear", "o_proj": "RowParallelLinear",
                "gate_up_proj": "MergedColumnParallelLinear", "down_proj": "RowParallelLinear"}
FLOAT_DTYPES = ("F16", "BF16", "F32")
UNUSED_VISION = ("head.", "post_layernorm.")  # never run (hidden_states[-2]); uninitialized is harmless
# SGLang's hard-coded media geometry, under the names of the geometry keys of our config.json
HARD_CODED = {
    "nvila": {"image_aspect_ratio": ("dynamic_s2",), "s2_scales": ([448, 896, 1344],),
              "s2_resize_output_to_scale_idx": (-1, 2), "mm_projector_type": ("mlp_downsample_2x2_fix",
                                                                              "mlp_downsample")},
    "nvila_lite": {"image_aspect_ratio": ("dynamic",), "mm_projector_type": ("mlp_downsample_3x3_fix",)},
}
HARD_CODED_BOTH = {"mm_vision_select_layer": (-2,), "mm_vision_select_feature": ("cls_patch",)}


@dataclass(frozen=True)
class Tensor:
    dtype: str  # safetensors dtype tag: "BF16", "I32", ...
    shape: tuple[int, ...]


def read_safetensors_headers(root: Path) -> dict[str, Tensor]:
    """Name -> (dtype, shape) of every tensor in the folder's ``*.safetensors`` files (headers only)."""
    out: dict[str, Tensor] = {}
    for path in sorted(Path(root).glob("*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                out[name] = Tensor(info["dtype"], tuple(info["shape"]))
    return out


# ---------------------------------------------------------------------------- quantization config
def parse_quant_config(config: Mapping[str, Any], root: Path) -> tuple[dict | None, list[str]]:
    """(the quant config SGLang uses, problems) in ``ModelConfig._parse_quant_hf_config``'s order."""
    problems = []
    text_cfg = config.get("text_config") or {}
    if config.get("quantization_config") is not None:
        quant = dict(config["quantization_config"])
        if "quant_method" not in quant or quant["quant_method"] == "modelopt":
            algo = quant.get("quant_algo")
            problems.append(f"quantization_config has no quant_method (ModelOpt is assumed; quant_algo {algo!r} "
                            "maps to nothing SGLang serves)")
        return quant, problems
    if config.get("compression_config") is not None:
        return dict(config["compression_config"]), problems
    modelopt = Path(root) / "hf_quant_config.json"
    if modelopt.is_file():
        algo = json.loads(modelopt.read_text()).get("quantization", {}).get("quant_algo")
        if not algo or not any(tag in algo for tag in ("FP8", "FP4", "MIXED_PRECISION")):
            problems.append(f"hf_quant_config.json quant_algo {algo!r}: SGLang's ModelOpt parser maps only FP8, "
                            "FP4 / NVFP4 and MIXED_PRECISION (W4A16_AWQ is not served)")
        return {"quant_method": "modelopt", "quant_algo": algo}, problems
    if text_cfg.get("quantization_config") is not None:
        problems.append("quantization_config sits in text_config; SGLang reads only the top-level one (and "
                        "compression_config, hf_quant_config.json): the LLM would be built unquantized")
    return None, problems


def _model_dtype(config: Mapping[str, Any], dtype: str) -> str:
    """SGLang's ``_get_and_verify_dtype`` on text_config: "float16" / "bfloat16" / "float32"."""
    if dtype != "auto":
        return {"half": "float16", "float": "float32"}.get(dtype, dtype)
    text_cfg = config.get("text_config") or {}
    stored = str(text_cfg.get("dtype") or text_cfg.get("torch_dtype") or "float32").removeprefix("torch.")
    return "float16" if stored == "float32" else stored


# ---------------------------------------------------------------------------- the LLM's parameters
@dataclass
class LinearPlan:
    """How SGLang builds one (fused) linear: its shards' (N, K), quantized or not, and the packed layout."""

    prefix: str  # e.g. "model.layers.0.self_attn.qkv_proj" (the quant code sees "llm." + prefix)
    shards: dict[Any, tuple[int, int]]  # shard id -> (N, K); None for an unfused layer
    bias: bool
    method: str | None = None  # None (float), "awq", "ct"
    group_size: int = -1
    symmetric: bool = True


def _linears(text_cfg: Mapping[str, Any]) -> list[LinearPlan]:
    hidden = text_cfg["hidden_size"]
    heads = text_cfg["num_attention_heads"]
    kv_heads = text_cfg.get("num_key_value_heads") or heads
    head_dim = text_cfg.get("head_dim") or hidden // heads
    inter = text_cfg["intermediate_size"]
    plans = []
    for i in range(text_cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        plans += [
            LinearPlan(f"{p}.self_attn.qkv_proj", {"q": (heads * head_dim, hidden), "k": (kv_heads * head_dim, hidden),
                                                  "v": (kv_heads * head_dim, hidden)}, bias=True),
            LinearPlan(f"{p}.self_attn.o_proj", {None: (hidden, heads * head_dim)}, bias=False),
            LinearPlan(f"{p}.mlp.gate_up_proj", {0: (inter, hidden), 1: (inter, hidden)}, bias=False),
            LinearPlan(f"{p}.mlp.down_proj", {None: (hidden, inter)}, bias=False),
        ]
    return plans


def _match(value: str, target: str, contains: bool) -> bool:
    """compressed-tensors' ``_is_equal_or_regex_match``."""
    if target.startswith("re:"):
        return re.match(target[3:], value) is not None
    if contains:
        return target.lower() in value.lower()
    return target == value


def _ct_ignored(prefix: str, ignore: list[str], problems: list[str]) -> bool:
    """``should_ignore_layer`` with Qwen2's fused mapping: every shard must agree."""
    proj = prefix.rsplit(".", 1)[-1]
    if proj in FUSED and prefix not in ignore:
        flags = {shard: any(_match(prefix.replace(proj, shard), t, True) for t in ignore) for shard in FUSED[proj]}
        if len(set(flags.values())) > 1:
            problems.append(f"compressed-tensors ignore list covers only some shards of {prefix}: {flags} "
                            "(SGLang: 'Found a different quantization schemes')")
        return any(flags.values())
    return any(_match(prefix, t, True) for t in ignore)


def _ct_scheme(prefix: str, groups: dict[str, dict], problems: list[str]) -> dict | None:
    """``find_matched_target``: layer name (exact / re:), then class name (substring), then all fused shards."""
    targets = [(t, g) for g in groups.values() for t in g.get("targets", [])]
    for t, g in targets:
        if _match(prefix, t, False):
            return g
    cls = LINEAR_CLASS[prefix.rsplit(".", 1)[-1]]
    for t, g in targets:
        if _match(cls, t, True):
            return g
    proj = prefix.rsplit(".", 1)[-1]
    if proj in FUSED:
        found = [next((g for t, g in targets if _match(prefix.replace(proj, s), t, False)), None) for s in FUSED[proj]]
        if all(found):
            return found[0]
    problems.append(f"no compressed-tensors target matches {prefix} (SGLang: 'Unable to find matching target')")
    return None


def _plan_quantization(plans: list[LinearPlan], quant: dict | None, method: str | None, problems: list[str]) -> None:
    if method in ("awq", "awq_marlin"):
        skip = list(quant.get("modules_to_not_convert") or [])
        group = quant.get("group_size", quant.get("q_group_size", 128))
        for plan in plans:
            if not any(m in f"llm.{plan.prefix}" for m in skip):  # is_layer_skipped_awq, on SGLang's prefix
                plan.method, plan.group_size, plan.symmetric = "awq", group, False
    elif method == "compressed-tensors":
        ignore = list(quant.get("ignore") or [])
        groups = dict(quant.get("config_groups") or {})
        for plan in plans:
            if _ct_ignored(f"llm.{plan.prefix}", ignore, problems):
                continue
            group = _ct_scheme(f"llm.{plan.prefix}", groups, problems)
            if group is None:
                continue
            weights = group.get("weights") or {}
            plan.method = "ct"
            plan.group_size = -1 if weights.get("group_size") is None else int(weights["group_size"])
            plan.symmetric = bool(weights.get("symmetric", True))


def _shard_tensors(plan: LinearPlan, n: int, k: int) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """suffix -> (shape, dtypes) of one shard as the checkpoint must store it."""
    out: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}
    g = k if plan.group_size == -1 else plan.group_size
    if plan.method is None:
        out["weight"] = ((n, k), FLOAT_DTYPES)
    elif plan.method == "awq":
        out["qweight"] = ((k, n // 8), ("I32",))
        out["qzeros"] = ((k // g, n // 8), ("I32",))
        out["scales"] = ((k // g, n), FLOAT_DTYPES)
    else:
        out["weight_packed"] = ((n, k // 8), ("I32",))
        out["weight_scale"] = ((n, k // g), FLOAT_DTYPES)
        out["weight_shape"] = ((2,), ("I64", "I32"))
        if not plan.symmetric:
            out["weight_zero_point"] = ((n // 8, k // g), ("I32",))
    if plan.bias:
        out["bias"] = ((n,), FLOAT_DTYPES)
    return out


def expected_llm_params(
    text_cfg: Mapping[str, Any], quant: dict | None, method: str | None, problems: list[str]
) -> tuple[dict[str, dict[Any, tuple[tuple[int, ...], tuple[str, ...]]]], list[LinearPlan]]:
    """SGLang's Qwen2 parameter names -> {shard id: (shape, dtypes)} (shard None: the whole parameter)."""
    hidden, vocab = text_cfg["hidden_size"], text_cfg["vocab_size"]
    plans = _linears(text_cfg)
    _plan_quantization(plans, quant, method, problems)
    params: dict[str, dict[Any, tuple[tuple[int, ...], tuple[str, ...]]]] = {
        "model.embed_tokens.weight": {None: ((vocab, hidden), FLOAT_DTYPES)},
        "model.norm.weight": {None: ((hidden,), FLOAT_DTYPES)},
    }
    for i in range(text_cfg["num_hidden_layers"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            params[f"model.layers.{i}.{norm}.weight"] = {None: ((hidden,), FLOAT_DTYPES)}
    for plan in plans:
        for shard, (n, k) in plan.shards.items():
            for suffix, spec in _shard_tensors(plan, n, k).items():
                params.setdefault(f"{plan.prefix}.{suffix}", {})[shard] = spec
    if not text_cfg.get("tie_word_embeddings", False):
        head = LinearPlan("lm_head", {None: (vocab, hidden)}, bias=False)
        skip = list((quant or {}).get("modules_to_not_convert") or [])
        if method == "awq_marlin" and quant.get("lm_head") and not any(m in "llm.lm_head" for m in skip):
            head.method, head.group_size, head.symmetric = "awq", quant.get("group_size", 128), False
            plans.append(head)
        for suffix, spec in _shard_tensors(head, vocab, hidden).items():
            params[f"lm_head.{suffix}"] = {None: spec}
    return params, plans


# ---------------------------------------------------------------------------- vision tower and projector
@dataclass
class Geometry:
    """Projector input width C and LLM width H SGLang builds the projector with."""

    variant: str
    mm_hidden: int
    hidden: int

    def projector_params(self) -> dict[str, tuple[int, ...]]:
        c, h = self.mm_hidden, self.hidden
        if self.variant == "nvila":
            layers = {1: ("ln", 4 * c), 2: ("linear", 4 * c, h), 4: ("linear", h, h)}
        else:
            layers = {1: ("ln", 9 * c), 2: ("linear", 9 * c, 3 * c), 4: ("ln", 3 * c), 5: ("linear", 3 * c, h),
                      7: ("linear", h, h)}
        out = {}
        for i, spec in layers.items():
            if spec[0] == "ln":
                out[f"mm_projector.layers.{i}.weight"] = (spec[1],)
                out[f"mm_projector.layers.{i}.bias"] = (spec[1],)
            else:
                out[f"mm_projector.layers.{i}.weight"] = (spec[2], spec[1])
                out[f"mm_projector.layers.{i}.bias"] = (spec[2],)
        return out


def vision_params(vision_cfg: Mapping[str, Any], transformers_major: int = 4) -> dict[str, tuple[int, ...]]:
    """``vision_tower.`` + SiglipVisionModel(vision_config).named_parameters() -> shape, as transformers
    ``transformers_major`` names them (4.x: with the ``vision_model.`` level)."""
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(**{k: v for k, v in vision_cfg.items() if k not in ("model_type", "architectures")})
    with torch.device("meta"):
        model = SiglipVisionModel(cfg)
    level = "vision_model." if transformers_major < 5 else ""
    return {f"vision_tower.{level}{name.removeprefix('vision_model.')}": tuple(p.shape)
            for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------- the check
def _check_config(config: Mapping[str, Any], root: Path, stock_geometry: bool) -> tuple[str | None, list[str]]:
    problems = []
    archs = config.get("architectures") or []
    variant = ARCHITECTURES.get(archs[0]) if archs else None
    if variant is None:
        problems.append(f"architectures[0] is {archs[0] if archs else None!r}; SGLang serves NVILA as "
                        f"{' or '.join(ARCHITECTURES)}")
    elif config.get("model_type") != variant:
        problems.append(f"model_type {config.get('model_type')!r} does not match {archs[0]} ({variant!r})")
    config_class = (config.get("auto_map") or {}).get("AutoConfig")
    if not config_class:
        problems.append("config.json has no auto_map.AutoConfig: transformers does not know model_type "
                        f"{config.get('model_type')!r}, so SGLang (--trust-remote-code) cannot build the config")
    elif not (root / f"{config_class.split('.')[0]}.py").is_file():
        problems.append(f"auto_map.AutoConfig names {config_class} but {config_class.split('.')[0]}.py is missing")
    for key, model_type in (("text_config", "qwen2"), ("vision_config", "siglip_vision_model")):
        sub = config.get(key)
        if not isinstance(sub, dict):
            problems.append(f"config.json lacks {key} (SGLang builds the model from it)")
        elif sub.get("model_type", model_type) != model_type:
            problems.append(f"{key}.model_type is {sub.get('model_type')!r}; SGLang builds {model_type}")
    vocab = (config.get("text_config") or {}).get("vocab_size")
    for key in ("image_token_id", "video_token_id"):
        tid = config.get(key)
        if not isinstance(tid, int) or tid < 0:
            problems.append(f"config.json {key} is {tid!r}; SGLang finds media tokens by this id")
        elif isinstance(vocab, int) and tid >= vocab:
            problems.append(f"{key}={tid} is outside text_config.vocab_size={vocab}")
    if variant is not None:
        rules = {**HARD_CODED_BOTH, **HARD_CODED[variant]}
        for key, allowed in rules.items():
            if key in config and config[key] not in allowed and not (
                    key == "s2_scales" and isinstance(config[key], str)
                    and [int(s) for s in config[key].split(",")] in allowed):
                problems.append(f"config.json {key}={config[key]!r}, but SGLang hard-codes {allowed[0]!r}")
        for key in ("image_encoder", "video_encoder"):
            target = str((config.get(key) or {}).get("_target_", "Basic")).rsplit(".", 1)[-1]
            if not target.startswith("Basic"):
                problems.append(f"config.json {key} is {target}; SGLang feeds features as Basic encoders do")
        vision = config.get("vision_config") or {}
        if variant == "nvila" and vision.get("image_size", 448) != 448:
            problems.append(f"vision_config.image_size={vision.get('image_size')}; SGLang's S2 scales start at 448")
        if stock_geometry and vision.get("hidden_size", 1152) * (3 if variant == "nvila" else 1) != \
                STOCK_MM_HIDDEN[variant]:
            problems.append(f"vision hidden {vision.get('hidden_size')} gives features of another width than "
                            f"SGLang's MM_HIDDEN_SIZE={STOCK_MM_HIDDEN[variant]}")
    return variant, problems


def _check_tokenizer(config: Mapping[str, Any], root: Path, load_processor: bool) -> list[str]:
    from transformers import AutoProcessor, AutoTokenizer

    problems = []
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(root), trust_remote_code=True)  # SGLang passes it on
    except (OSError, ValueError) as e:
        return [f"the tokenizer in {root} does not load: {e}"]
    for kind in ("image", "video"):
        token = getattr(tokenizer, f"{kind}_token", None)
        if not isinstance(token, str):
            problems.append(f"the tokenizer has no {kind}_token attribute (SGLang's NVILA processor reads "
                            f"tokenizer.{kind}_token; set extra_special_tokens in tokenizer_config.json)")
            continue
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid != config.get(f"{kind}_token_id"):
            problems.append(f"tokenizer {kind}_token {token!r} has id {tid}, config.json {kind}_token_id is "
                            f"{config.get(f'{kind}_token_id')!r}")
    if load_processor and not problems:
        try:
            processor = AutoProcessor.from_pretrained(str(root), trust_remote_code=True)
        except Exception as e:  # noqa: BLE001 (any failure here is a load failure in SGLang)
            return [f"AutoProcessor.from_pretrained(trust_remote_code=True) fails: {e}"]
        for kind in ("image", "video"):  # SGLang reads them from the processor's tokenizer
            if not isinstance(getattr(getattr(processor, "tokenizer", None), f"{kind}_token", None), str):
                problems.append(f"the processor's tokenizer lacks {kind}_token")
    return problems


def check_sglang_checkpoint(
    root: Path,
    *,
    stock_geometry: bool = True,
    sm: int = 90,
    dtype: str = "auto",
    tp: int = 1,
    require_marlin: bool = False,
    asymmetric_wna16: bool = True,
    transformers_major: int = 4,
    load_processor: bool = True,
) -> list[str]:
    """Reasons SGLang would not load ``root`` (a flat -hf NVILA folder) correctly; empty when it loads.

    ``stock_geometry``: hold widths to SGLang's hard-coded MM_HIDDEN_SIZE (False for tiny test models: the
    projector is then checked against the checkpoint's own vision width). ``sm``: GPU compute capability (90 =
    H100). ``dtype``: the server's ``--dtype``. ``require_marlin``: an AWQ checkpoint must run entirely on
    awq_marlin (at ``tp``). ``asymmetric_wna16``: the SGLang version takes asymmetric compressed-tensors W4A16
    (PR 25292). ``transformers_major``: the transformers SGLang runs with (names of the SigLIP parameters).
    """
    root = Path(root)
    if not (root / "config.json").is_file():
        return [f"{root} has no config.json"]
    config = json.loads((root / "config.json").read_text())
    variant, problems = _check_config(config, root, stock_geometry)
    problems += _check_tokenizer(config, root, load_processor)
    text_cfg, vision_cfg = config.get("text_config"), config.get("vision_config")
    if variant is None or not isinstance(text_cfg, dict) or not isinstance(vision_cfg, dict):
        return problems

    # quantization method and the dtype it runs in
    quant, quant_problems = parse_quant_config(config, root)
    problems += quant_problems
    method = None if quant is None else str(quant.get("quant_method", "")).lower()
    method = "compressed-tensors" if method == "compressed_tensors" else method
    model_dtype = _model_dtype(config, dtype)
    if method == "awq":
        method = "awq_marlin" if not config_reasons(quant, sm=sm, min_sm=80) else "awq"
        bits = quant.get("bits", quant.get("w_bit"))
        if method == "awq":
            if bits != 4:
                problems.append(f"AWQ takes 4-bit weights only, got bits={bits}")
            if sm < 75:
                problems.append(f"AWQ needs sm75+, GPU is sm{sm}")
            if model_dtype != "float16":
                why = "; ".join(config_reasons(quant, sm=sm, min_sm=80))
                problems.append(f"quant_method awq runs on plain AWQ here ({why}), which takes float16 only, but the "
                                f"model dtype is {model_dtype} (serve with --dtype float16)")
            if require_marlin:
                problems += [f"not awq_marlin: {r}" for r in config_reasons(quant, sm=sm, min_sm=80)]
        elif model_dtype not in ("float16", "bfloat16"):
            problems.append(f"awq_marlin takes float16 / bfloat16, the model dtype is {model_dtype}")
    elif method == "compressed-tensors":
        if quant.get("format") not in (None, "pack-quantized") and not all(
                g.get("format", "pack-quantized") == "pack-quantized" for g in quant.get("config_groups", {}).values()):
            problems.append(f"compressed-tensors format {quant.get('format')!r}: SGLang's W4A16 path needs "
                            "pack-quantized")
        if sm < 80:
            problems.append(f"compressed-tensors WNA16 (marlin) needs sm80+, GPU is sm{sm}")
        for name, group in (quant.get("config_groups") or {}).items():
            w = group.get("weights") or {}
            if group.get("input_activations"):
                problems.append(f"config group {name} quantizes activations: not a W4A16 scheme")
            if w.get("num_bits") not in (4, 8) or w.get("type", "int") != "int" or w.get("dynamic"):
                problems.append(f"config group {name} weights {w}: WNA16 takes static int 4 / 8 bits")
            if w.get("strategy") not in ("group", "channel") or (w.get("strategy") == "group"
                                                                 and not w.get("group_size")):
                problems.append(f"config group {name}: WNA16 needs group (with group_size) or channel strategy")
            if not w.get("symmetric", True) and not asymmetric_wna16:
                problems.append(f"config group {name} is asymmetric; this SGLang takes symmetric W4A16 only "
                                "(asymmetric since PR 25292)")
    elif method is not None and method != "modelopt":
        problems.append(f"quant_method {method!r} is not one this oracle knows SGLang to serve for NVILA")

    # every tensor name -> the parameter it loads into
    params, plans = expected_llm_params(text_cfg, quant, method if method != "modelopt" else None, problems)
    tied = bool(text_cfg.get("tie_word_embeddings", False))
    mm_hidden = (STOCK_MM_HIDDEN[variant] if stock_geometry
                 else vision_cfg.get("hidden_size", 1152) * (len(config.get("s2_scales") or [448, 896, 1344])
                                                            if variant == "nvila" else 1))
    other = {**vision_params(vision_cfg, transformers_major),
             **Geometry(variant, mm_hidden, text_cfg["hidden_size"]).projector_params()}
    tensors = read_safetensors_headers(root)
    if not tensors:
        problems.append(f"no *.safetensors in {root}")
    loaded: dict[str, set] = {}
    for name, tensor in sorted(tensors.items()):
        if not name.startswith("llm."):
            if name not in other:
                problems.append(f"KeyError: {name} is not a parameter of SGLang's model "
                                "(vision_tower = SiglipVisionModel, mm_projector.layers)")
            elif tensor.shape != other[name]:
                problems.append(f"{name}: shape {tensor.shape}, SGLang's parameter is {other[name]}")
            elif tensor.dtype not in FLOAT_DTYPES:
                problems.append(f"{name}: dtype {tensor.dtype}; the vision tower and projector are float modules")
            loaded.setdefault(name, set()).add(None)
            continue
        sub = name[len("llm."):]
        if "rotary_emb.inv_freq" in sub or "projector" in sub or (tied and "lm_head.weight" in sub):
            continue
        param, shard = sub, None
        for fused, piece, shard_id in STACKED:
            if piece in sub:
                param, shard = sub.replace(piece, fused), shard_id
                break
        if param.endswith(".bias") and param not in params:
            continue  # SGLang skips extra biases (GPTQ rule)
        if param not in params:
            problems.append(f"KeyError: llm.{sub} loads into {param}, which SGLang's Qwen2 (as quantized by "
                            f"{method or 'nothing'}) does not have")
            continue
        if shard not in params[param]:
            problems.append(f"llm.{sub}: {param} has no shard {shard!r}")
            continue
        shape, dtypes = params[param][shard]
        if tensor.shape != shape:
            problems.append(f"llm.{sub}: shape {tensor.shape}, SGLang expects {shape} for {param}"
                            f"{'' if shard is None else f' shard {shard!r}'}")
        if tensor.dtype not in dtypes:
            problems.append(f"llm.{sub}: dtype {tensor.dtype}, expected one of {dtypes}")
        loaded.setdefault(param, set()).add(shard)
    for param, shards in params.items():
        missing = set(shards) - loaded.get(param, set())
        if missing:
            problems.append(f"llm.{param} never loaded (shards {sorted(map(str, missing))}): SGLang leaves it "
                            "uninitialized")
    for name in other:
        bare = name.removeprefix("vision_tower.").removeprefix("vision_model.")
        if name not in loaded and not bare.startswith(UNUSED_VISION):
            problems.append(f"{name} never loaded: SGLang leaves it uninitialized")

    # kernels: marlin shape rules (compressed-tensors has no fallback; awq_marlin falls back per layer)
    shapes = {f"llm.{p.prefix}": (sum(n for n, _ in p.shards.values()), next(iter(p.shards.values()))[1])
              for p in plans if p.method is not None}
    for plan in plans:
        if plan.method == "ct":
            reasons = layer_reasons(f"llm.{plan.prefix}", shapes[f"llm.{plan.prefix}"], plan.group_size, tp)
            problems += [r.replace(" -> plain awq fallback", " (compressed-tensors WNA16: load fails)")
                         for r in reasons]
    if method == "awq_marlin" and require_marlin:
        for plan in plans:
            if plan.method == "awq":
                problems += layer_reasons(f"llm.{plan.prefix}", shapes[f"llm.{plan.prefix}"], plan.group_size, tp)
    return problems
