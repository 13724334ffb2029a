"""``make-tiny``: seeded synthetic NVILA checkpoints in the real on-disk layout.

Everything is real: a byte-level BPE tokenizer trained locally with ``tokenizers`` (Qwen2's pre-tokenizer,
special tokens and chat template), a ``SiglipVisionModel`` at 448 px / patch 14, a GQA ``Qwen2ForCausalLM``
and NVILA's projector, written exactly as VILA's ``save_pretrained`` lays them out.

``outliers=True`` plants activation outlier channels the way trained LLMs have them, without changing the
model's function: a few channels get a large norm weight (x alpha) while the matching input columns of
the next linears are divided by alpha, and likewise for the v->o and up->down pairs and the projector's
LayerNorm -> Linear. Those channels are salient (their weights carry a large share of the output), so
round-to-nearest loses them and activation-aware methods keep them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers import logging as hf_logging

from nvila_quant.errors import ConfigError
from nvila_quant.io import atomic_output_dir, save_state_dict, write_json
from nvila_quant.model.config import LAYOUTS, dtype_from_str, load_config
from nvila_quant.model.layout import write_hf
from nvila_quant.model.projector import MultimodalProjector
from nvila_quant.model.tokenizer import QWEN2_CHAT_TEMPLATE

__all__ = ["TinySpec", "build_tokenizer", "make_tiny", "plant_outliers", "plant_vision_outliers", "synthetic_corpus"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[BOS]", "[PAD]"]
# Qwen2's pre-tokenizer split pattern
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


@dataclass
class TinySpec:
    """Sizes of a synthetic NVILA. Defaults: a tiny model for tests (seconds on 2 CPU cores).

    Args:
        variant: "nvila" (dynamic S2, 2x2 downsample) or "nvila-lite" (dynamic tiling, 3x3 downsample).
        vision_intermediate: SigLIP MLP width; deliberately not a multiple of 128 (so400m's is 4304).
        llm_kv_heads: < llm_heads for grouped-query attention, as in Qwen2.
        outliers / outlier_channels / outlier_scale: planted activation outliers (see module docstring).
        vision_outliers: also plant outlier channels in the vision tower (layer_norm1 -> q/k/v, layer_norm2 -> fc1),
            function preserving as in the LLM: what W8A8's per-token activation scales suffer from.
        tie_embeddings: lm_head shares embed_tokens (as NVILA-Lite's Qwen2.5-1.5B); the checkpoint then stores no
            ``lm_head.weight``, as transformers' save_pretrained writes tied models.
        llm_vocab: stored embedding / head rows; 0 = the tokenizer's. More rows model a padded vocabulary (Qwen2
            stores 151936 rows for 151665 tokens) and a head the size of a real one.
    """

    variant: str = "nvila"
    seed: int = 0
    outliers: bool = True
    vision_outliers: bool = False
    vision_hidden: int = 64
    vision_intermediate: int = 172
    vision_layers: int = 3
    vision_heads: int = 4
    image_size: int = 448
    patch_size: int = 14
    llm_hidden: int = 256
    llm_intermediate: int = 640
    llm_layers: int = 4
    llm_heads: int = 4
    llm_kv_heads: int = 2
    vocab_merges: int = 1000
    model_max_length: int = 4096
    outlier_channels: int = 4
    outlier_scale: float = 32.0
    salience: float = 4.0
    dtype: str = "bfloat16"  # of the stored weights: bf16 / fp16 / fp32 (kept as the long name, as VILA writes it)
    tie_embeddings: bool = False
    llm_vocab: int = 0

    def __post_init__(self) -> None:
        self.dtype = str(dtype_from_str(self.dtype)).removeprefix("torch.")
        if self.variant not in ("nvila", "nvila-lite"):
            raise ConfigError(f"variant must be 'nvila' or 'nvila-lite', got {self.variant!r}")
        if self.llm_hidden % self.llm_heads or self.llm_heads % self.llm_kv_heads:
            raise ConfigError(
                f"llm_hidden ({self.llm_hidden}) must divide by llm_heads ({self.llm_heads}) and llm_heads by "
                f"llm_kv_heads ({self.llm_kv_heads})"
            )
        if self.vision_hidden % self.vision_heads:
            raise ConfigError(
                f"vision_hidden ({self.vision_hidden}) must divide by vision_heads ({self.vision_heads})"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )


# ---------------------------------------------------------------------------- tokenizer
# Word lists and sentence templates of the tokenizer's training corpus (a data file shipped with the package).
_CORPUS = json.loads((Path(__file__).parent / "corpus.json").read_text())
_WORDS: dict[str, list[str]] = _CORPUS["words"]
_TEMPLATES: list[str] = _CORPUS["templates"]


def synthetic_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Seeded English-like sentences (captions, questions, a little code) to train the tiny tokenizer."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = rng.choice(_TEMPLATES)
        out.append(
            t.format(
                adj=rng.choice(_WORDS["adj"]),
                adj2=rng.choice(_WORDS["adj"]),
                noun=rng.choice(_WORDS["noun"]),
                noun2=rng.choice(_WORDS["noun"]),
                verb=rng.choice(_WORDS["verb"]),
                prep=rng.choice(_WORDS["prep"]),
                num=rng.randint(0, 120),
            )
        )
    return out


def build_tokenizer(vocab_merges: int = 1000, seed: int = 0, model_max_length: int = 4096):
    """Train a Qwen2-style byte-level BPE tokenizer; returns a ``Qwen2Tokenizer`` with NVILA's special tokens."""
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + vocab_merges,
        initial_alphabet=alphabet,
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(synthetic_corpus(seed=seed), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    for special in SPECIAL_TOKENS:  # ids right after the BPE vocab, in Qwen2's order
        vocab[special] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="[PAD]"
    )
    tokenizer.add_tokens(SPECIAL_TOKENS, special_tokens=True)
    tokenizer.chat_template = QWEN2_CHAT_TEMPLATE
    tokenizer.model_max_length = model_max_length
    return tokenizer


# ---------------------------------------------------------------------------- outliers
@torch.no_grad()
def _plant(
    norm_weight: torch.Tensor,
    linears: list[torch.nn.Linear],
    channels: torch.Tensor,
    alpha: float,
    salience: float,
) -> None:
    """norm/producer side x alpha, consumer input columns / alpha * salience (salience is part of the
    random init: the planted channels carry a larger share of the output)."""
    norm_weight[channels] *= alpha
    for lin in linears:
        lin.weight[:, channels] *= salience / alpha


@torch.no_grad()
def plant_outliers(
    llm: Qwen2ForCausalLM, projector: MultimodalProjector, spec: TinySpec, gen: torch.Generator
) -> dict:
    """Plant outlier channels in every decoder block and the projector. Returns the planted channels."""
    cfg = llm.config
    k, alpha, sal = spec.outlier_channels, spec.outlier_scale, spec.salience
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    planted: dict[str, list[int]] = {}
    for i, layer in enumerate(llm.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        ch = torch.randperm(cfg.hidden_size, generator=gen)[:k]
        _plant(layer.input_layernorm.weight, [attn.q_proj, attn.k_proj, attn.v_proj], ch, alpha, sal)
        ch2 = torch.randperm(cfg.hidden_size, generator=gen)[:k]
        _plant(layer.post_attention_layernorm.weight, [mlp.gate_proj, mlp.up_proj], ch2, alpha, sal)
        # v -> o: v output row r feeds o_proj input column h*head_dim + d for every query head h of its KV group
        rows = torch.randperm(attn.v_proj.weight.shape[0], generator=gen)[: max(1, k // 2)]
        attn.v_proj.weight[rows] *= alpha
        attn.v_proj.bias[rows] *= alpha
        for r in rows.tolist():
            kv, d = divmod(r, head_dim)
            cols = [(kv * group + g) * head_dim + d for g in range(group)]
            attn.o_proj.weight[:, cols] *= sal / alpha
        # up -> down
        rows2 = torch.randperm(mlp.up_proj.weight.shape[0], generator=gen)[:k]
        mlp.up_proj.weight[rows2] *= alpha
        mlp.down_proj.weight[:, rows2] *= sal / alpha
        planted[f"model.layers.{i}"] = ch.tolist() + ch2.tolist()
    # projector: LayerNorm -> first Linear
    layers = projector.layers
    if isinstance(layers, torch.nn.Sequential):
        mods = list(layers)
        for j, m in enumerate(mods[:-1]):
            if isinstance(m, torch.nn.LayerNorm) and isinstance(mods[j + 1], torch.nn.Linear):
                ch = torch.randperm(m.weight.shape[0], generator=gen)[:k]
                m.bias[ch] *= alpha
                _plant(m.weight, [mods[j + 1]], ch, alpha, sal)
                planted[f"mm_projector.layers.{j}"] = ch.tolist()
    return planted


@torch.no_grad()
def plant_vision_outliers(vision: SiglipVisionModel, spec: TinySpec, gen: torch.Generator) -> dict:
    """Outlier channels in every SigLIP encoder layer: the LayerNorms' outputs (weight and bias) x alpha on a few
    channels, the consuming linears' input columns / alpha (x salience). Returns the planted channels."""
    k, alpha, sal = spec.outlier_channels, spec.outlier_scale, spec.salience
    vit = getattr(vision, "vision_model", vision)
    planted: dict[str, list[int]] = {}
    for i, layer in enumerate(vit.encoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        width = layer.layer_norm1.weight.shape[0]
        ch = torch.randperm(width, generator=gen)[:k]
        layer.layer_norm1.bias[ch] *= alpha
        _plant(layer.layer_norm1.weight, [attn.q_proj, attn.k_proj, attn.v_proj], ch, alpha, sal)
        ch2 = torch.randperm(width, generator=gen)[:k]
        layer.layer_norm2.bias[ch2] *= alpha
        _plant(layer.layer_norm2.weight, [mlp.fc1], ch2, alpha, sal)
        planted[f"vision_model.encoder.layers.{i}"] = ch.tolist() + ch2.tolist()
    return planted


# ---------------------------------------------------------------------------- checkpoint
@torch.no_grad()
def _init_weights(module: torch.nn.Module, gen: torch.Generator, out_scale: float = 1.0) -> None:
    """Scale-preserving random init (std 1/sqrt(fan_in)) so activations and logits have a realistic spread."""
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / m.weight.shape[1] ** 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.02)
        elif isinstance(m, torch.nn.Embedding):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen))


def _llm(spec: TinySpec, vocab_size: int, gen: torch.Generator) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=spec.llm_hidden,
        intermediate_size=spec.llm_intermediate,
        num_hidden_layers=spec.llm_layers,
        num_attention_heads=spec.llm_heads,
        num_key_value_heads=spec.llm_kv_heads,
        max_position_embeddings=max(8192, spec.model_max_length),
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=spec.tie_embeddings,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=None,
    )
    llm = Qwen2ForCausalLM(cfg)
    _init_weights(llm, gen)
    with torch.no_grad():  # peakier next-token distributions than a 1/sqrt(d) head
        llm.lm_head.weight.mul_(3.0)
    return llm


def _vision(spec: TinySpec, gen: torch.Generator) -> SiglipVisionModel:
    cfg = SiglipVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )
    model = SiglipVisionModel(cfg)
    _init_weights(model, gen)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(0.5)  # patch conv: keep the residual stream moderate
    return model


def _dtype(spec: TinySpec) -> torch.dtype:
    return dtype_from_str(spec.dtype)


def make_tiny(output: str | os.PathLike, spec: TinySpec | None = None, overwrite: bool = False,
              layout: str = "vila") -> Path:
    """Write a seeded synthetic NVILA (or NVILA-Lite) checkpoint to ``output`` in a published layout: ``"vila"``
    (three folders, as VILA's ``save_pretrained``) or ``"hf"`` (flat, as NVIDIA's "-hf" repositories)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "hf":
        with atomic_output_dir(output, overwrite=overwrite) as tmp:
            stage = make_tiny(tmp / ".vila", spec)
            write_hf(load_config(stage), tmp, progress=False)
            shutil.copy2(stage / "make_tiny.json", tmp / "make_tiny.json")
            shutil.rmtree(stage)
            (tmp / "nvila_quant_export.json").unlink()
        return Path(output)
    spec = spec or TinySpec()
    torch.manual_seed(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    lite = spec.variant == "nvila-lite"
    dtype = _dtype(spec)

    tokenizer = build_tokenizer(spec.vocab_merges, spec.seed, spec.model_max_length)
    stored_vocab = max(len(tokenizer), spec.llm_vocab)
    llm = _llm(spec, stored_vocab, gen)
    vision = _vision(spec, gen)
    scales = [] if lite else [spec.image_size, 2 * spec.image_size, 3 * spec.image_size]
    mm_hidden = spec.vision_hidden * (1 if lite else len(scales))
    projector_type = "mlp_downsample_3x3_fix" if lite else "mlp_downsample_2x2_fix"
    projector = MultimodalProjector(projector_type, mm_hidden, spec.llm_hidden)
    _init_weights(projector, gen)
    planted = plant_outliers(llm, projector, spec, gen) if spec.outliers else {}
    if spec.vision_outliers:
        planted.update(plant_vision_outliers(vision, spec, gen))

    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            # llm/
            llm_dir = tmp / "llm"
            llm.config.model_max_length = spec.model_max_length
            llm.config.tokenizer_model_max_length = spec.model_max_length
            llm.config.tokenizer_padding_side = "right"
            llm.config.architectures = ["Qwen2ForCausalLM"]
            llm.config.dtype = dtype
            llm.config.save_pretrained(str(llm_dir))
            GenerationConfig(do_sample=False, max_new_tokens=64, eos_token_id=None).save_pretrained(
                str(llm_dir)
            )
            tied = {"lm_head.weight"} if spec.tie_embeddings else set()
            save_state_dict({k: v.to(dtype) for k, v in llm.state_dict().items() if k not in tied}, llm_dir)
            tokenizer.save_pretrained(str(llm_dir))
            # vision_tower/  (keys carry the "vision_model." prefix, as NVIDIA's files do)
            vt_dir = tmp / "vision_tower"
            vision.config.architectures = ["SiglipVisionModel"]
            vision.config.dtype = dtype
            vision.config.save_pretrained(str(vt_dir))
            save_state_dict(
                {
                    (k if k.startswith("vision_model.") else f"vision_model.{k}"): v.to(dtype)
                    for k, v in vision.state_dict().items()
                },
                vt_dir,
            )
            write_json(
                vt_dir / "preprocessor_config.json",
                {
                    "do_normalize": True,
                    "do_rescale": True,
                    "do_resize": True,
                    "image_mean": [0.5, 0.5, 0.5],
                    "image_std": [0.5, 0.5, 0.5],
                    "image_processor_type": "SiglipImageProcessor",
                    "processor_class": "SiglipProcessor",
                    "resample": 3,
                    "rescale_factor": 1 / 255,
                    "size": {"height": spec.image_size, "width": spec.image_size},
                },
            )
            # mm_projector/
            mp_dir = tmp / "mm_projector"
            save_state_dict({k: v.to(dtype) for k, v in projector.state_dict().items()}, mp_dir)
            mp_cfg = {**projector.config_dict(), "torch_dtype": spec.dtype}
            write_json(mp_dir / "config.json", mp_cfg)
        finally:
            hf_logging.set_verbosity(verbosity)
        # root config.json (NVILA-8B's keys)
        llm_cfg = json.loads((llm_dir / "config.json").read_text())
        vt_cfg = json.loads((vt_dir / "config.json").read_text())
        root = {
            "_name_or_path": str(Path(output).absolute()),
            "architectures": ["LlavaLlamaModel"],
            "model_type": "llava_llama",
            "llm_cfg": {**llm_cfg, "_name_or_path": "./llm"},
            "vision_tower_cfg": {**vt_cfg, "_name_or_path": "./vision_tower"},
            "mm_projector_cfg": {**mp_cfg, "_name_or_path": "./mm_projector"},
            "resume_path": "./",
            "hidden_size": spec.llm_hidden,
            "mm_hidden_size": mm_hidden,
            "image_aspect_ratio": "dynamic" if lite else "dynamic_s2",
            "dynamic_s2": not lite,
            "s2": False,
            "s2_scales": ",".join(str(s) for s in scales) if scales else "448,896,1344",
            "s2_max_split_size": spec.image_size,
            "s2_resize_output_to_scale_idx": -1,
            "min_tiles": 1,
            "max_tiles": 12,
            "video_max_tiles": 1,
            "num_video_frames": 8,
            "fps": 0.0,
            "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "cls_patch",
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": True,
            "interpolate_mode": "linear",
            "num_time_tokens": 0,
            "model_dtype": f"torch.{spec.dtype}",
            "chat_template": None,
            "image_encoder": {"_target_": "llava.model.encoders.BasicImageEncoder"},
            "video_encoder": {"_target_": "llava.model.encoders.BasicVideoEncoder"},
        }
        write_json(tmp / "config.json", root)
        write_json(tmp / "make_tiny.json", {"spec": asdict(spec), "planted_outliers": planted})
    return Path(output)
