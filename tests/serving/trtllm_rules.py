"""Oracle of what TensorRT-LLM's PyTorch backend needs to load an NVILA checkpoint (three folders, W4A16_AWQ).

Written from facts read (not copied) in NVIDIA/TensorRT-LLM and NVIDIA/TensorRT-Model-Optimizer; independent of
``nvila_quant`` (it parses safetensors headers itself and unpacks ModelOpt int4 on its own), so the tests compare two
implementations.

- ``tensorrt_llm/_torch/models/modeling_vila.py``:
  ``VilaConfig``: ``model_type`` "llava_llama", registered architecture "LlavaLlamaModel".
  ``_convert_dtype``: ``model_dtype`` must be the string "torch.float16" or "torch.bfloat16" (else ValueError; when
  absent it warns and uses fp16).
  ``_get_model_paths``: for ``llm_cfg``, ``vision_tower_cfg``, ``mm_projector_cfg`` (a dict needs ``_name_or_path``)
  the path is the root joined with ``basename(_name_or_path.strip("/"))``; a plain string is taken as the path.
  ``init_mm_projector``: a falsy ``resume_path`` builds a randomly initialised projector; a truthy one loads
  ``VilaMultimodalProjector.from_pretrained(mm_projector/)``: plain ``nn.Sequential`` ``layers`` (no activation
  scales) of the types listed in ``PROJECTOR_TYPES``.
  ``init_vision_tower``: ``AutoImageProcessor.from_pretrained(vision_tower/)``; S2 / dynamic S2 sets
  ``mm_hidden_size`` to the tower width times the number of scales.
  ``init_tokenizer``: ``AutoConfig.from_pretrained(llm/).model_max_length`` (so llm/config.json must have it), then
  ``AutoTokenizer.from_pretrained(llm/, model_max_length=..., padding_side="right", use_fast=False, legacy=False)``;
  the stop token is ``decode(eos_token_id)``; with conversation mode "auto" the prompt comes from the tokenizer's
  chat template.
  ``VilaModel.__init__`` / ``init_llm``: the LLM is built from llm/config.json with a deep copy of the ROOT model
  config (so the root's quantization applies to it); ``llm_checkpoint_dir`` makes its weights load from llm/.
- ``tensorrt_llm/_torch/model_config.py`` ``ModelConfig.from_pretrained`` (on the root): ``hf_quant_config.json``
  first (the legacy ``{"producer", "quantization": {...}}`` shape: ``quant_algo``, ``group_size``,
  ``kv_cache_quant_algo``, ``exclude_modules``, ``has_zero_point``, ``pre_quant_scale``); only without it the root
  ``config.json`` ``quantization_config`` through ``load_hf_quant_config``, which knows fp8, mxfp4, mxfp8, nvfp4,
  compressed-tensors and inline ModelOpt: anything else (``awq``) leaves the model unquantized.
- ``tensorrt_llm/models/modeling_utils.py`` ``QuantConfig.is_module_excluded_from_quantization``: ``fnmatchcase``
  of the module name against each ``exclude_modules`` pattern (newer releases also try every dotted ancestor).
  ``tensorrt_llm/_torch/models/modeling_utils.py``: exclusion is decided per module of TRT-LLM's tree, where
  q/k/v load as one ``self_attn.qkv_proj`` and gate/up as one ``mlp.gate_up_proj`` (``params_map``); the lm_head is
  built without a quantization config.
- ``tensorrt_llm/_torch/modules/linear.py`` ``W4A16_AWQ_LinearMethod`` and the shared load helpers: a checkpoint
  ``weight`` is transposed and cast to int8 before the int4 preprocessing, i.e. stored (N/2, K) with two output rows
  per byte; ``weight_scale`` is stored (N, K/G) (transposed at load); ``in_features % group_size == 0`` or
  ``create_weights`` raises; the unfused (vanilla) path reads ``pre_quant_scale`` (K,) unconditionally (o_proj,
  down_proj), the fused q/k/v and gate/up paths never read it; biases are required where the module has them;
  the GEMM runs with ``zeros=None`` (``has_zero_point`` must be false).
- ``cpp/tensorrt_llm/kernels/cutlass_kernels/fpA_intB_gemm`` (fine-grained kernels): group size 64 or 128 only.
- NVIDIA/TensorRT-Model-Optimizer ``modelopt/torch/export/quant_utils.py`` (``to_quantized_weight`` ->
  ``pack_int4_in_uint8``): value = round(w / s) clamped to [-8, 7]; output rows 2i and 2i + 1 share byte row i,
  2i in the low nibble (two's complement nibbles).
"""

from __future__ import annotations

import fnmatch
import json
import re
import struct
from pathlib import Path

import torch

__all__ = [
    "GROUP_SIZES",
    "MODEL_DTYPES",
    "PROJECTOR_TYPES",
    "check_trtllm_checkpoint",
    "dequantized_llm_weights",
    "read_header",
    "unpack_w4a16_awq",
]

MODEL_DTYPES = ("torch.float16", "torch.bfloat16")
GROUP_SIZES = (64, 128)
PROJECTOR_TYPES = ("identity", "linear", "mlp_downsample", "mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix",
                   "mlp_downsample_3x3_s2", "mlp_downsample_3x3_s2_new")  # and mlp<N>x_gelu
HF_QUANT_METHODS = ("fp8", "mxfp4", "mxfp8", "nvfp4", "compressed-tensors")  # load_hf_quant_config's branches
FLOATS = ("F16", "BF16", "F32")
INT8S = ("I8", "U8")
# TRT-LLM linear -> checkpoint linears it loads (fused ones read q/k/v or gate/up together, without pre_quant_scale)
DECODER_LINEARS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


# ---------------------------------------------------------------------------------------------- numerics
def unpack_w4a16_awq(weight: torch.Tensor, weight_scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """ModelOpt W4A16_AWQ -> float32 (N, K) weight.

    weight: (N/2, K) int8 or uint8, byte [i, k] = value[2i, k] (low nibble) | value[2i + 1, k] (high nibble), each a
    4-bit two's complement number in [-8, 7]; weight_scale: (N, K/G). w[n, k] = value[n, k] * scale[n, k // G]."""
    raw = weight.view(torch.uint8).to(torch.int32)  # (N/2, K)
    low, high = raw % 16, raw // 16
    both = torch.empty((raw.shape[0] * 2, raw.shape[1]), dtype=torch.int32)
    both[0::2], both[1::2] = low, high  # (N, K) nibbles
    signed = torch.where(both >= 8, both - 16, both)  # [-8, 7]
    scale = weight_scale.float().repeat_interleave(group_size, dim=1)  # (N, K)
    return signed.float() * scale


# ---------------------------------------------------------------------------------------------- files
def read_header(path: Path) -> dict[str, dict]:
    """A safetensors file's header: {name: {"dtype", "shape", "data_offsets"}} (no tensor data read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _folder_tensors(folder: Path) -> dict[str, tuple[Path, dict]]:
    """name -> (file, header entry) over every ``*.safetensors`` file of a folder."""
    out: dict[str, tuple[Path, dict]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        for name, info in read_header(f).items():
            out[name] = (f, info)
    return out


def _load(tensors: dict[str, tuple[Path, dict]], name: str) -> torch.Tensor:
    from safetensors import safe_open

    path = tensors[name][0]
    with safe_open(str(path), framework="pt") as h:
        return h.get_tensor(name)


def _json(path: Path, problems: list[str]) -> dict | None:
    if not path.is_file():
        problems.append(f"missing {path}")
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        problems.append(f"{path} is not valid JSON: {e}")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path} is not a JSON object")
        return None
    return data


# ---------------------------------------------------------------------------------------------- rules
def _component_paths(root: Path, cfg: dict, problems: list[str]) -> dict[str, Path]:
    paths = {}
    for key in ("llm_cfg", "vision_tower_cfg", "mm_projector_cfg"):
        sub = cfg.get(key)
        if isinstance(sub, dict):
            name = sub.get("_name_or_path")
            if not name:
                problems.append(f"config.json {key} has no _name_or_path")
                continue
            path = root / Path(str(name).strip("/")).name
        elif isinstance(sub, str):
            path = Path(sub)  # taken as is, not joined to the root
        else:
            problems.append(f"config.json {key} is missing or not a dict / path (got {type(sub).__name__})")
            continue
        if not path.is_dir():
            problems.append(f"config.json {key} resolves to {path}, which is not a folder")
            continue
        paths[key.removesuffix("_cfg")] = path
    return paths


def _quant_config(root: Path, cfg: dict, problems: list[str]) -> dict | None:
    """The W4A16_AWQ settings TRT-LLM would build (None: unquantized)."""
    path = root / "hf_quant_config.json"
    if not path.is_file():
        qc = cfg.get("quantization_config")
        if isinstance(qc, dict):
            method = str(qc.get("quant_method", "")).lower()
            modelopt = method.startswith("modelopt") or (qc.get("producer") or {}).get("name") == "modelopt"
            if not modelopt and method not in HF_QUANT_METHODS:
                problems.append(f"root config.json quantization_config has quant_method {method!r}, which TRT-LLM "
                                "does not read (and there is no hf_quant_config.json): the LLM is built unquantized")
        return None
    data = _json(path, problems)
    if data is None:
        return None
    q = data.get("quantization")
    if not isinstance(q, dict):
        problems.append("hf_quant_config.json has no 'quantization' object")
        return None
    algo = q.get("quant_algo")
    if algo != "W4A16_AWQ":
        problems.append(f"hf_quant_config.json quant_algo is {algo!r}; this oracle covers W4A16_AWQ only")
        return None
    g = q.get("group_size")
    if g not in GROUP_SIZES:
        problems.append(f"hf_quant_config.json group_size {g!r}: TRT-LLM's W4A16 kernels take {GROUP_SIZES}")
    if q.get("has_zero_point"):
        problems.append("hf_quant_config.json has_zero_point is true, but W4A16_AWQ runs its GEMM without zeros")
    if q.get("kv_cache_quant_algo") is not None:
        problems.append(f"hf_quant_config.json kv_cache_quant_algo {q.get('kv_cache_quant_algo')!r} (no KV-cache "
                        "scales are exported)")
    exclude = q.get("exclude_modules") or []
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        problems.append("hf_quant_config.json exclude_modules must be a list of strings")
        exclude = []
    return {"group_size": g if isinstance(g, int) else None, "exclude": exclude}


def _excluded(name: str, patterns: list[str]) -> tuple[bool, bool]:
    """(excluded by the module's own name, excluded when dotted ancestors are tried too)."""
    own = any(fnmatch.fnmatchcase(name, p) for p in patterns)
    parts = name.split(".")
    ancestors = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
    return own, own or any(fnmatch.fnmatchcase(a, p) for a in ancestors for p in patterns)


def _expect(tensors: dict, name: str, shape: tuple[int, ...], dtypes: tuple[str, ...], problems: list[str]) -> bool:
    if name not in tensors:
        problems.append(f"llm/ lacks {name}")
        return False
    info = tensors[name][1]
    if tuple(info["shape"]) != tuple(shape) or info["dtype"] not in dtypes:
        problems.append(f"llm/{name} is {info['dtype']} {tuple(info['shape'])}, expected one of {dtypes} {shape}")
        return False
    return True


def _linear_shapes(llm: dict) -> dict[str, tuple[int, int]]:
    """Checkpoint linear (relative to a decoder layer) -> (N, K), from a Qwen2 / Llama config."""
    h, nh = llm["hidden_size"], llm["num_attention_heads"]
    nkv = llm.get("num_key_value_heads") or nh
    hd = llm.get("head_dim") or h // nh
    inter = llm["intermediate_size"]
    return {
        "self_attn.q_proj": (nh * hd, h), "self_attn.k_proj": (nkv * hd, h), "self_attn.v_proj": (nkv * hd, h),
        "self_attn.o_proj": (h, nh * hd), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
        "mlp.down_proj": (h, inter),
    }


def _check_llm(llm_dir: Path, quant: dict | None, problems: list[str], load_tokenizer: bool) -> None:
    llm = _json(llm_dir / "config.json", problems)
    if llm is None:
        return
    if not isinstance(llm.get("model_max_length"), int):
        problems.append("llm/config.json has no integer model_max_length (init_tokenizer reads it)")
    elif load_tokenizer:
        _check_tokenizer(llm_dir, llm["model_max_length"], problems)
    tensors = _folder_tensors(llm_dir)
    if not tensors:
        problems.append("llm/ has no safetensors weights")
        return
    try:
        shapes = _linear_shapes(llm)
        n_layers, vocab, h = llm["num_hidden_layers"], llm["vocab_size"], llm["hidden_size"]
    except KeyError as e:
        problems.append(f"llm/config.json lacks {e}")
        return
    _expect(tensors, "model.embed_tokens.weight", (vocab, h), FLOATS, problems)
    _expect(tensors, "model.norm.weight", (h,), FLOATS, problems)
    if not llm.get("tie_word_embeddings", False):
        _expect(tensors, "lm_head.weight", (vocab, h), FLOATS, problems)  # LMHead takes no quantization
    g = quant["group_size"] if quant else None
    exclude = quant["exclude"] if quant else []
    for i in range(n_layers):
        prefix = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            _expect(tensors, f"{prefix}{norm}.weight", (h,), FLOATS, problems)
        for trt, members in DECODER_LINEARS.items():
            own, walked = _excluded(prefix + trt, exclude)
            if own != walked:
                problems.append(f"{prefix}{trt} is excluded only through an ancestor pattern, which older TRT-LLM "
                                "releases do not try")
            quantized = quant is not None and not own
            biases = [f"{prefix}{m}.bias" in tensors for m in members]
            if any(biases) and not all(biases):
                problems.append(f"{prefix}{trt}: some of {members} have a bias and some do not")
            for m in members:
                name, (n, k) = prefix + m, shapes[m]
                if any(key.startswith(name + ".") and key.rsplit(".", 1)[1] in ("qweight", "qzeros", "scales")
                       for key in tensors):
                    problems.append(f"llm/{name} has AutoAWQ tensors (qweight/qzeros/scales), which TRT-LLM ignores")
                if all(biases):
                    _expect(tensors, f"{name}.bias", (n,), FLOATS, problems)
                if not quantized:
                    _expect(tensors, f"{name}.weight", (n, k), FLOATS, problems)
                    continue
                if n % 2:
                    problems.append(f"{name}: out_features {n} is odd; W4A16 packs two output rows per byte")
                if g is None or k % g:
                    problems.append(f"{name}: in_features {k} is not a multiple of group_size {g}")
                    continue
                _expect(tensors, f"{name}.weight", (n // 2, k), INT8S, problems)
                _expect(tensors, f"{name}.weight_scale", (n, k // g), FLOATS, problems)
                pqs = f"{name}.pre_quant_scale"
                if len(members) == 1:  # vanilla load: pre_quant_scale is read unconditionally
                    _expect(tensors, pqs, (k,), FLOATS, problems)
                elif pqs in tensors and not bool((_load(tensors, pqs) == 1).all()):
                    problems.append(f"llm/{pqs} is not all ones, but the fused {trt} load never applies it")


def _check_tokenizer(llm_dir: Path, max_length: int, problems: list[str]) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(llm_dir), model_max_length=max_length, padding_side="right",
                                            use_fast=False, legacy=False)
    except Exception as e:  # noqa: BLE001 (any failure is the finding)
        problems.append(f"llm/ tokenizer does not load as init_tokenizer loads it: {type(e).__name__}: {e}")
        return
    if tok.eos_token_id is None:
        problems.append("llm/ tokenizer has no eos token (TRT-LLM's stop token is decode(eos_token_id))")
    try:
        tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001
        problems.append(f"llm/ tokenizer has no usable chat template: {type(e).__name__}: {e}")


def _projector_keys(kind: str, c: int, h: int) -> dict[str, tuple[int, ...]] | None:
    """Expected float tensors of VilaMultimodalProjector ``kind`` (input width c, LLM width h)."""
    def linear(i: str, n: int, k: int) -> dict:
        return {f"layers.{i}.weight": (n, k), f"layers.{i}.bias": (n,)}

    def norm(i: str, n: int) -> dict:
        return {f"layers.{i}.weight": (n,), f"layers.{i}.bias": (n,)}

    if kind == "identity":
        return {}
    if kind == "linear":
        return {"layers.weight": (h, c), "layers.bias": (h,)}
    if kind in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        return {**norm("1", 4 * c), **linear("2", h, 4 * c), **linear("4", h, h)}
    if kind == "mlp_downsample_3x3_fix":
        return {**norm("1", 9 * c), **linear("2", 3 * c, 9 * c), **norm("4", 3 * c), **linear("5", h, 3 * c),
                **linear("7", h, h)}
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if m:
        out = linear("0", h, c)
        for j in range(1, int(m.group(1))):
            out.update(linear(str(2 * j), h, h))
        return out
    return None  # the s2 variants: not shape-checked here


def _check_projector(mp_dir: Path, root_cfg: dict, vt_cfg: dict | None, problems: list[str]) -> None:
    cfg = _json(mp_dir / "config.json", problems)
    if cfg is None:
        return
    kind = cfg.get("mm_projector_type")
    if kind not in PROJECTOR_TYPES and not re.fullmatch(r"mlp\d+x_gelu", str(kind)):
        problems.append(f"mm_projector/config.json mm_projector_type {kind!r} is not one TRT-LLM builds")
        return
    for key in ("quantization_config", "compression_config", "scaled_activations"):
        if key in cfg:
            problems.append(f"mm_projector/config.json has {key!r}: TRT-LLM's projector is plain float "
                            "(Linear, GELU, LayerNorm)")
    tensors = _folder_tensors(mp_dir)
    if vt_cfg is None or "hidden_size" not in vt_cfg or "hidden_size" not in root_cfg:
        return
    s2 = root_cfg.get("dynamic_s2") or root_cfg.get("s2")
    scales = [s for s in str(root_cfg.get("s2_scales", "")).split(",") if s.strip()] if s2 else ["x"]
    expected = _projector_keys(kind, vt_cfg["hidden_size"] * len(scales), root_cfg["hidden_size"])
    if expected is None:
        return
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"mm_projector/ lacks {missing} (they would be randomly initialised)")
    if extra:
        problems.append(f"mm_projector/ has tensors the projector does not have: {extra[:6]}")
    for name, shape in expected.items():
        if name in tensors:
            info = tensors[name][1]
            if tuple(info["shape"]) != shape or info["dtype"] not in FLOATS:
                problems.append(f"mm_projector/{name} is {info['dtype']} {tuple(info['shape'])}, expected {shape}")


def check_trtllm_checkpoint(root: Path, load_tokenizer: bool = True) -> list[str]:
    """Problems that stop (or silently break) TRT-LLM loading ``root`` as NVILA; empty when it loads.

    ``load_tokenizer``: also load llm/'s tokenizer with transformers the way ``init_tokenizer`` does."""
    root = Path(root)
    problems: list[str] = []
    cfg = _json(root / "config.json", problems)
    if cfg is None:
        return problems
    if (cfg.get("architectures") or [None])[0] != "LlavaLlamaModel":
        problems.append(f"config.json architectures {cfg.get('architectures')!r}: TRT-LLM registers LlavaLlamaModel")
    if cfg.get("model_type") != "llava_llama":
        problems.append(f"config.json model_type {cfg.get('model_type')!r}: TRT-LLM registers llava_llama")
    if "model_dtype" not in cfg:
        problems.append("config.json has no model_dtype (TRT-LLM warns and runs in float16)")
    elif cfg["model_dtype"] not in MODEL_DTYPES:
        problems.append(f"config.json model_dtype {cfg['model_dtype']!r}: TRT-LLM takes {MODEL_DTYPES}")
    if not cfg.get("resume_path"):
        problems.append(f"config.json resume_path {cfg.get('resume_path')!r} is falsy: TRT-LLM would build a random "
                        "projector instead of loading mm_projector/")
    paths = _component_paths(root, cfg, problems)
    quant = _quant_config(root, cfg, problems)
    if "llm" in paths:
        _check_llm(paths["llm"], quant, problems, load_tokenizer)
    vt_cfg = None
    if "vision_tower" in paths:
        vt = paths["vision_tower"]
        vt_cfg = _json(vt / "config.json", problems)
        if not (vt / "preprocessor_config.json").is_file():
            problems.append("vision_tower/ has no preprocessor_config.json (AutoImageProcessor needs it)")
        if vt_cfg is not None and "quantization_config" in vt_cfg:
            problems.append("vision_tower/config.json has a quantization_config; TRT-LLM runs the tower in fp16")
        vt_tensors = _folder_tensors(vt)
        if not vt_tensors:
            problems.append("vision_tower/ has no safetensors weights")
        elif any(info["dtype"] not in FLOATS for _, info in vt_tensors.values()):
            problems.append("vision_tower/ has non-float tensors")
    if "mm_projector" in paths:
        _check_projector(paths["mm_projector"], cfg, vt_cfg, problems)
    return problems


def dequantized_llm_weights(root: Path) -> dict[str, torch.Tensor]:
    """Every W4A16_AWQ linear of ``root/llm`` (checkpoint module name -> float32 (N, K)), unpacked by this oracle."""
    q = json.loads((Path(root) / "hf_quant_config.json").read_text())["quantization"]
    tensors = _folder_tensors(Path(root) / "llm")
    out = {}
    for name in sorted(tensors):
        if name.endswith(".weight_scale"):
            module = name.removesuffix(".weight_scale")
            out[module] = unpack_w4a16_awq(_load(tensors, module + ".weight"), _load(tensors, name),
                                           q["group_size"])
    return out
