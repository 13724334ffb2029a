"""``NVILAQwen2``: the concrete NVILA model (Qwen2 LLM + SigLIP + projector) built from a checkpoint folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, SiglipVisionConfig, SiglipVisionModel

from nvila_quant.errors import CheckpointError
from nvila_quant.io import load_state_dict, read_json, safetensors_key_map
from nvila_quant.model.config import NVILAConfig, dtype_from_str, load_config
from nvila_quant.model.encoders import build_encoder
from nvila_quant.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel
from nvila_quant.model.llm import quiet_transformers
from nvila_quant.model.onnx_vision import build_onnx_vision_tower
from nvila_quant.model.projector import MultimodalProjector
from nvila_quant.model.quantized import is_quantized, load_quantized_llm, load_quantized_projector
from nvila_quant.model.session import DecodeSession
from nvila_quant.model.tokenizer import load_tokenizer
from nvila_quant.model.vision import VisionTower, load_image_processor

__all__ = ["NVILAQwen2", "build_mm_projector", "build_vision_tower", "default_device", "load_llm"]

logger = logging.getLogger(__name__)

# SigLIP weights NVILA never runs (features come from hidden_states[-2]); tolerated when absent.
_UNUSED_VISION_PREFIXES = ("head.", "post_layernorm.", "vision_model.head.", "vision_model.post_layernorm.")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_loading_info(folder: Path, info: dict[str, Any], ignore: tuple[str, ...] = ()) -> None:
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(ignore)]
    mismatched = info.get("mismatched_keys", [])
    if missing:
        raise CheckpointError(
            f"weights in {folder} lack {len(missing)} tensor(s) the model needs, e.g. {sorted(missing)[:4]}"
        )
    if mismatched:
        raise CheckpointError(f"weights in {folder} have shapes that disagree with config.json: {mismatched[:4]}")


def load_llm(llm_dir: Path, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """The float LLM of ``llm/`` as a real transformers causal LM (``Qwen2ForCausalLM`` on NVILA)."""
    cfg = read_json(llm_dir / "config.json")
    if cfg.get("quantization_config"):  # packed int4 linears: the quantized runtime builds QuantLinear modules
        return load_quantized_llm(llm_dir, dtype, device)
    safetensors_key_map(llm_dir)  # validates every shard before transformers reads it
    try:
        with quiet_transformers():
            llm, info = AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot load the LLM in {llm_dir}: {e}") from e
    ignore = ("lm_head.",) if getattr(llm.config, "tie_word_embeddings", False) else ()
    _check_loading_info(llm_dir, info, ignore)
    return llm.to(device).eval()


def build_vision_tower(vt_dir: Path, config: NVILAConfig, dtype: torch.dtype, device: torch.device) -> VisionTower:
    cfg = read_json(vt_dir / "config.json")
    if cfg.get("model_type") not in ("siglip_vision_model", "siglip"):
        raise CheckpointError(
            f"{vt_dir}/config.json has model_type {cfg.get('model_type')!r}; NVILA's vision tower is "
            "'siglip_vision_model'"
        )
    safetensors_key_map(vt_dir)
    # a full SigLIP config (model_type "siglip"): take its vision part
    extra = {"config": SiglipVisionConfig(**cfg.get("vision_config", {}))} if cfg.get("model_type") == "siglip" else {}
    try:
        with quiet_transformers():
            model, info = SiglipVisionModel.from_pretrained(str(vt_dir), dtype=dtype, output_loading_info=True, **extra)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot load the vision tower in {vt_dir}: {e}") from e
    _check_loading_info(vt_dir, info, _UNUSED_VISION_PREFIXES)
    scales = config.s2_scales if config.is_dynamic_s2 else None
    if scales and scales[0] != model.config.image_size:
        raise CheckpointError(
            f"s2_scales start at {scales[0]} px but the vision tower in {vt_dir} takes "
            f"{model.config.image_size} px tiles"
        )
    tower = VisionTower(
        model.to(device).eval(),
        select_layer=config.mm_vision_select_layer,
        select_feature=config.mm_vision_select_feature,
        scales=scales,
        resize_output_to_scale_idx=config.s2_resize_output_to_scale_idx,
    )
    tower.image_processor = load_image_processor(vt_dir, model.config.image_size)
    return tower


def build_mm_projector(
    mp_dir: Path, config: NVILAConfig, mm_hidden_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device
) -> MultimodalProjector:
    cfg = read_json(mp_dir / "config.json")
    projector_type = cfg.get("mm_projector_type") or (config.mm_projector_cfg or {}).get("mm_projector_type")
    if not projector_type:
        raise CheckpointError(f"{mp_dir}/config.json lacks 'mm_projector_type'")
    top = (config.mm_projector_cfg or {}).get("mm_projector_type")
    if top and top != projector_type:
        logger.warning("mm_projector_cfg says %r but %s/config.json says %r; using the latter", top, mp_dir,
                       projector_type)
    projector = MultimodalProjector(projector_type, mm_hidden_size, hidden_size, cfg.get("scaled_activations", []))
    state = load_state_dict(mp_dir, dtype=dtype)
    expected = projector.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{mp_dir}/model.safetensors does not match projector type {projector_type!r}: "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{mp_dir}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)} "
                f"for {projector_type} with mm_hidden_size={mm_hidden_size}, hidden_size={hidden_size}"
            )
    projector.load_state_dict(state)
    return projector.to(device=device, dtype=dtype).eval()


class NVILAQwen2(nn.Module, LlavaMetaModel, LlavaMetaForCausalLM):
    """NVILA / NVILA-Lite with a Qwen2 LLM, loaded from the three-folder layout.

    >>> model = NVILAQwen2.load_pretrained("NVILA-8B", torch_dtype=torch.float16)
    >>> model.generate_content([Image("photo.jpg"), "Describe the image."])
    """

    def __init__(
        self,
        config: NVILAConfig | str | os.PathLike,
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.init_vlm(load_config(config), torch_dtype=torch_dtype, device=device, **kwargs)

    def init_vlm(
        self,
        config: NVILAConfig,
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        vision_backend: str = "torch",
        onnx_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(kwargs)}")
        self.config = config
        dtype = dtype_from_str(torch_dtype) if torch_dtype is not None else config.dtype
        device = torch.device(device) if device is not None else default_device()
        llm_dir, vt_dir, mp_dir = (config.subfolder(n) for n in ("llm", "vision_tower", "mm_projector"))
        for folder in (llm_dir, vt_dir, mp_dir):
            safetensors_key_map(folder)  # fail on a corrupt file before any slow loading

        self.llm = self.build_llm(llm_dir, dtype, device)
        llm_cfg = self.llm.config
        max_len = (
            getattr(llm_cfg, "model_max_length", None)
            or getattr(llm_cfg, "tokenizer_model_max_length", None)
            or getattr(llm_cfg, "max_position_embeddings", None)
        )
        self.tokenizer = load_tokenizer(llm_dir, model_max_length=max_len, chat_template=config.chat_template)
        padding_side = getattr(llm_cfg, "tokenizer_padding_side", None)
        if padding_side in ("left", "right"):
            self.tokenizer.padding_side = padding_side
        self._grow_embeddings(len(self.tokenizer))

        if vision_backend == "torch" and onnx_dir is None:
            self.vision_tower = build_vision_tower(vt_dir, config, dtype, device)
        else:  # vision tower through onnxruntime (an `nvila-export onnx` folder); same interface
            self.vision_tower = build_onnx_vision_tower(vision_backend, onnx_dir, vt_dir, config, dtype, device)
        if config.mm_hidden_size and config.mm_hidden_size != self.vision_tower.hidden_size:
            raise CheckpointError(
                f"config.json mm_hidden_size={config.mm_hidden_size} but the vision tower gives features of width "
                f"{self.vision_tower.hidden_size} (hidden {self.vision_tower.config.hidden_size} x "
                f"{len(config.s2_scales) if config.is_dynamic_s2 else 1} scale(s))"
            )
        if config.hidden_size and config.hidden_size != llm_cfg.hidden_size:
            raise CheckpointError(
                f"config.json hidden_size={config.hidden_size} but llm/config.json hidden_size={llm_cfg.hidden_size}"
            )
        self.mm_projector = self.build_projector(mp_dir, self.vision_tower.hidden_size, llm_cfg.hidden_size, dtype,
                                                 device)
        self.encoders = {
            "image": build_encoder(config.image_encoder, self),
            "video": build_encoder(config.video_encoder, self),
        }
        self.post_config()
        self.eval()
        self.decode_session = DecodeSession(self.llm)  # owns the KV cache of stream_gen and chat sessions

    # Overridable builders: the quantized runtime swaps in packed linears here.
    def build_llm(self, llm_dir: Path, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
        return load_llm(llm_dir, dtype, device)  # quantized llm/ -> nvila_quant.model.quantized

    def build_projector(
        self, mp_dir: Path, mm_hidden_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device
    ) -> nn.Module:
        if is_quantized(mp_dir):
            cfg = read_json(mp_dir / "config.json")
            projector_type = (cfg.get("mm_projector_type")
                              or (self.config.mm_projector_cfg or {}).get("mm_projector_type"))
            if not projector_type:
                raise CheckpointError(f"{mp_dir}/config.json lacks 'mm_projector_type'")
            return load_quantized_projector(mp_dir, projector_type, mm_hidden_size, hidden_size, dtype, device)
        return build_mm_projector(mp_dir, self.config, mm_hidden_size, hidden_size, dtype, device)

    def _grow_embeddings(self, n_tokens: int) -> None:
        """Grow input/output embeddings to the tokenizer (media tokens); new rows = mean of the old ones."""
        llm = self.llm
        old = llm.get_input_embeddings().weight.shape[0]
        if n_tokens <= old:
            return
        llm.resize_token_embeddings(n_tokens, mean_resizing=False)
        with torch.no_grad():
            emb = llm.get_input_embeddings().weight
            emb[old:] = emb[:old].float().mean(0).to(emb.dtype)
            head = llm.get_output_embeddings()
            if head is not None and head.weight.data_ptr() != emb.data_ptr():
                head.weight[old:] = head.weight[:old].float().mean(0).to(head.weight.dtype)
                if getattr(head, "bias", None) is not None:
                    head.bias[old:] = head.bias[:old].float().mean()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Training-style forward: ``input_ids, media, media_config, labels, attention_mask`` -> LLM output."""
        input_ids = kwargs.pop("input_ids", args[0] if args else None)
        media = kwargs.pop("media", None)
        media_config = kwargs.pop("media_config", None)
        labels = kwargs.pop("labels", None)
        attention_mask = kwargs.pop("attention_mask", None)
        inputs_embeds, labels, attention_mask = self.embed_inputs(input_ids, media, media_config, labels,
                                                                  attention_mask)
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)
