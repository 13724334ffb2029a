"""``NVILAQwen2``: the concrete NVILA model (Qwen2 LLM + SigLIP + projector) built from a checkpoint folder."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, SiglipVisionConfig, SiglipVisionModel

from nvila_quant.errors import CheckpointError
from nvila_quant.formats.compressed_tensors import check_int8_config
from nvila_quant.io import Part, as_part, load_state_dict, read_tensors
from nvila_quant.kernels import QuantLinear
from nvila_quant.kernels.int8 import Int8Linear
from nvila_quant.model.config import NVILAConfig, dtype_from_str, load_config
from nvila_quant.model.encoders import build_encoder
from nvila_quant.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel
from nvila_quant.model.llm import mean_row, quiet_transformers
from nvila_quant.model.onnx_vision import build_onnx_vision_tower
from nvila_quant.model.projector import MultimodalProjector
from nvila_quant.model.quantized import (
    check_tensor_shapes,
    is_quantized,
    llm_config_from_dict,
    load_flat_llm,
    load_quantized_llm,
    load_quantized_projector,
    materialize_buffers,
)
from nvila_quant.model.session import DecodeSession
from nvila_quant.model.tokenizer import load_tokenizer
from nvila_quant.model.vision import VisionTower, load_image_processor

__all__ = ["NVILAQwen2", "build_mm_projector", "build_vision_tower", "default_device", "load_llm"]

logger = logging.getLogger(__name__)

# SigLIP weights NVILA never runs (features come from hidden_states[-2]); tolerated when absent.
_UNUSED_VISION_PREFIXES = ("head.", "post_layernorm.", "vision_model.head.", "vision_model.post_layernorm.")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_loading_info(part: Part, info: dict[str, Any], ignore: tuple[str, ...] = ()) -> None:
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(ignore)]
    mismatched = info.get("mismatched_keys", [])
    if missing:
        raise CheckpointError(
            f"weights in {part} lack {len(missing)} tensor(s) the model needs, e.g. {sorted(missing)[:4]}"
        )
    if mismatched:
        raise CheckpointError(f"weights in {part} have shapes that disagree with config.json: {mismatched[:4]}")


def load_llm(source: str | os.PathLike | Part, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """The float LLM of ``llm/`` (or of the ``llm.`` tensors of a flat -hf checkpoint) as a real transformers causal
    LM (``Qwen2ForCausalLM`` on NVILA); a quantized one through :mod:`nvila_quant.model.quantized`."""
    part = as_part(source)
    cfg = part.read_config()
    if cfg.get("quantization_config") or cfg.get("compression_config"):  # packed int4 linears: QuantLinear modules
        return load_quantized_llm(part, dtype, device)
    if part.flat:
        return load_flat_llm(part, dtype, device)
    key_map = part.key_map()  # validates every shard before transformers reads it
    with quiet_transformers(), torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(llm_config_from_dict(cfg, part))
    check_tensor_shapes(part, key_map, {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, "the LLM")
    try:
        with quiet_transformers():
            llm, info = AutoModelForCausalLM.from_pretrained(str(part.folder), dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot load the LLM in {part}: {e}") from e
    ignore = ("lm_head.",) if getattr(llm.config, "tie_word_embeddings", False) else ()
    _check_loading_info(part, info, ignore)
    return llm.to(device).eval()


def _siglip_config(cfg: dict, part: Part) -> SiglipVisionConfig:
    if cfg.get("model_type") not in ("siglip_vision_model", "siglip"):
        raise CheckpointError(
            f"the vision tower config of {part} has model_type {cfg.get('model_type')!r}; NVILA's vision tower is "
            "'siglip_vision_model'"
        )
    data = cfg.get("vision_config", {}) if cfg.get("model_type") == "siglip" else cfg  # a full SigLIP config
    data = {k: v for k, v in data.items()
            if k not in ("model_type", "architectures", "transformers_version", "quantization_config")}
    return SiglipVisionConfig(**data)


def _int8_skeleton(skeleton: nn.Module, ignore: list[str], stored: set[str], dtype: torch.dtype) -> list[str]:
    """Swap the Linear modules a W8A8 tower stores in int8 (a ``weight_scale`` in the file, not in ``ignore``)
    for ``Int8Linear`` (on the meta device). Returns their names."""
    swapped = []
    for name, mod in list(skeleton.named_modules()):
        full = name if name.startswith("vision_model.") else f"vision_model.{name}"
        if isinstance(mod, nn.Linear) and full not in ignore and f"{name}.weight_scale" in stored:
            owner, _, attr = name.rpartition(".")
            with torch.device("meta"):
                new = Int8Linear(mod.in_features, mod.out_features, mod.bias is not None, dtype)
            setattr(skeleton.get_submodule(owner) if owner else skeleton, attr, new)
            swapped.append(name)
    return swapped


def build_vision_tower(source: str | os.PathLike | Part, config: NVILAConfig, dtype: torch.dtype,
                       device: torch.device) -> VisionTower:
    part = as_part(source)
    raw = part.read_config()
    vision_config = _siglip_config(raw, part)
    qc = raw.get("quantization_config")
    ignore = check_int8_config(qc, part) if qc else []  # a W8A8 tower (nvila-quant awq --targets vision_tower)
    stored = part.key_map()
    with quiet_transformers(), torch.device("meta"):
        skeleton = SiglipVisionModel(vision_config)
    # files name the tensors "vision_model.*" (SiglipVisionModel's base prefix), which its state dict may omit
    strip = not any(k.startswith("vision_model.") for k in skeleton.state_dict())
    key_map = stored.renamed(lambda k: k.removeprefix("vision_model.")) if strip else stored
    int8 = _int8_skeleton(skeleton, ignore, set(key_map), dtype) if qc else []
    if qc and not int8:
        raise CheckpointError(f"{part}: its config says W8A8 but no Linear has an int8 weight and a weight_scale")
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    check_tensor_shapes(part, key_map, expected, "the vision tower")
    if part.flat or qc:
        unexpected = sorted(set(key_map) - set(expected))
        missing = sorted(k for k in set(expected) - set(key_map) if not k.startswith(_UNUSED_VISION_PREFIXES))
        if missing or unexpected:
            raise CheckpointError(f"weights in {part} do not match the vision config: missing {missing[:4]}, "
                                  f"unexpected {unexpected[:4]}")
        model = skeleton
        exact = {k for k in key_map if k.endswith(".weight_scale") or k.removesuffix(".weight") in int8}
        tensors = {**read_tensors(key_map, [k for k in key_map if k not in exact], dtype),
                   **read_tensors(key_map, sorted(exact))}  # int8 weights and fp32 scales as stored
        model.load_state_dict(tensors, strict=False, assign=True)
        bad = [n for n in int8 if model.get_submodule(n).weight.dtype != torch.int8]
        if bad:
            raise CheckpointError(f"{part}: {bad[:3]} have a weight_scale but no int8 weight (W8A8 stores int8)")
        materialize_buffers(model, torch.device("cpu"))
        for name, t in model.named_parameters():  # the never-run head / post_layernorm, when the file lacks them
            if t.device.type == "meta":
                owner, _, attr = name.rpartition(".")
                fresh = torch.zeros(t.shape, dtype=dtype)
                setattr(model.get_submodule(owner), attr, nn.Parameter(fresh, requires_grad=False))
    else:
        extra = {"config": vision_config}
        try:
            with quiet_transformers():
                model, info = SiglipVisionModel.from_pretrained(str(part.folder), dtype=dtype,
                                                                output_loading_info=True, **extra)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot load the vision tower in {part}: {e}") from e
        _check_loading_info(part, info, _UNUSED_VISION_PREFIXES)
    scales = config.s2_scales if config.is_dynamic_s2 else None
    if scales and scales[0] != model.config.image_size:
        raise CheckpointError(
            f"s2_scales start at {scales[0]} px but the vision tower in {part} takes "
            f"{model.config.image_size} px tiles"
        )
    tower = VisionTower(
        model.to(device).eval(),
        select_layer=config.mm_vision_select_layer,
        select_feature=config.mm_vision_select_feature,
        scales=scales,
        resize_output_to_scale_idx=config.s2_resize_output_to_scale_idx,
    )
    tower.image_processor = load_image_processor(part.folder, model.config.image_size)
    return tower


def projector_type_of(part: Part, config: NVILAConfig) -> str:
    """The projector type a sub-model config names (its own config first, then the root's ``mm_projector_cfg``)."""
    own = part.read_config().get("mm_projector_type")
    top = (config.mm_projector_cfg or {}).get("mm_projector_type")
    if not (own or top):
        raise CheckpointError(f"the projector config of {part} lacks 'mm_projector_type'")
    if own and top and top != own:
        logger.warning("mm_projector_cfg says %r but %s config says %r; using the latter", top, part, own)
    return own or top


def build_mm_projector(
    source: str | os.PathLike | Part, config: NVILAConfig, mm_hidden_size: int, hidden_size: int,
    dtype: torch.dtype, device: torch.device,
) -> MultimodalProjector:
    part = as_part(source)
    projector_type = projector_type_of(part, config)
    projector = MultimodalProjector(projector_type, mm_hidden_size, hidden_size,
                                    part.read_config().get("scaled_activations", []))
    state = load_state_dict(part, dtype=dtype)
    expected = projector.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"the projector in {part} does not match projector type {projector_type!r}: "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{part}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)} "
                f"for {projector_type} with mm_hidden_size={mm_hidden_size}, hidden_size={hidden_size}"
            )
    projector.load_state_dict(state)
    return projector.to(device=device, dtype=dtype).eval()


class NVILAQwen2(nn.Module, LlavaMetaModel, LlavaMetaForCausalLM):
    """NVILA / NVILA-Lite with a Qwen2 LLM, loaded from the three-folder or the flat -hf layout.

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
        llm_part, vt_part, mp_part = (config.part(n) for n in ("llm", "vision_tower", "mm_projector"))
        for part in (llm_part, vt_part, mp_part):
            part.key_map()  # fail on a corrupt file before any slow loading

        self.llm = self.build_llm(llm_part, dtype, device)
        llm_cfg = self.llm.config
        max_len = (
            getattr(llm_cfg, "model_max_length", None)
            or getattr(llm_cfg, "tokenizer_model_max_length", None)
            or getattr(llm_cfg, "max_position_embeddings", None)
        )
        self.tokenizer = load_tokenizer(llm_part.folder, model_max_length=max_len, chat_template=config.chat_template)
        self._check_media_token_ids()
        padding_side = getattr(llm_cfg, "tokenizer_padding_side", None)
        if padding_side in ("left", "right"):
            self.tokenizer.padding_side = padding_side
        self._grow_embeddings(len(self.tokenizer))

        if vision_backend == "torch" and onnx_dir is None:
            self.vision_tower = build_vision_tower(vt_part, config, dtype, device)
        else:  # vision tower through onnxruntime (an `nvila-export onnx` folder); same interface
            self.vision_tower = build_onnx_vision_tower(vision_backend, onnx_dir, vt_part, config, dtype, device)
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
        self.mm_projector = self.build_projector(mp_part, self.vision_tower.hidden_size, llm_cfg.hidden_size, dtype,
                                                 device)
        self.encoders = {
            "image": build_encoder(config.image_encoder, self),
            "video": build_encoder(config.video_encoder, self),
        }
        self.post_config()
        self.eval()
        self.decode_session = DecodeSession(self.llm)  # owns the KV cache of stream_gen and chat sessions

    # Overridable builders: the quantized runtime swaps in packed linears here.
    def build_llm(self, llm: Part, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
        return load_llm(llm, dtype, device)  # quantized llm/ -> nvila_quant.model.quantized

    def build_projector(
        self, mp: Part, mm_hidden_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device
    ) -> nn.Module:
        if is_quantized(mp):
            projector_type = projector_type_of(mp, self.config)
            return load_quantized_projector(mp, projector_type, mm_hidden_size, hidden_size, dtype, device)
        return build_mm_projector(mp, self.config, mm_hidden_size, hidden_size, dtype, device)

    def _check_media_token_ids(self) -> None:
        """An -hf config names the media token ids; they must be the tokenizer's."""
        hf = self.config.hf_config or {}
        for name, key in (("image", "image_token_id"), ("video", "video_token_id")):
            want, got = hf.get(key), self.tokenizer.media_token_ids[name]
            if want is not None and want >= 0 and want != got:
                raise CheckpointError(f"{self.config.root}/config.json has {key}={want} but the tokenizer gives "
                                      f"{self.tokenizer.media_tokens[name]!r} the id {got}")

    def _grow_embeddings(self, n_tokens: int) -> None:
        """Grow input/output embeddings to the tokenizer (media tokens); new rows = mean of the old ones. A packed
        (int4) head cannot grow: its checkpoint must already have the rows (``--quantize-lm-head`` writes them)."""
        llm = self.llm
        old = llm.get_input_embeddings().weight.shape[0]
        if n_tokens <= old:
            return
        head = llm.get_output_embeddings()
        if isinstance(head, QuantLinear):
            raise CheckpointError(
                f"{self.config.root}: the embeddings have {old} rows and the int4 lm_head {head.out_features}, but the "
                f"tokenizer (with its media tokens) has {n_tokens}; a packed head cannot be grown at load. Re-quantize "
                "with --quantize-lm-head, which grows the head to the tokenizer before quantizing it"
            )
        llm.resize_token_embeddings(n_tokens, mean_resizing=False)
        with torch.no_grad():
            emb = llm.get_input_embeddings().weight
            emb[old:] = mean_row(emb[:old], self.config.dtype)
            head = llm.get_output_embeddings()
            if head is not None and head.weight.data_ptr() != emb.data_ptr():
                head.weight[old:] = mean_row(head.weight[:old], self.config.dtype)
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
