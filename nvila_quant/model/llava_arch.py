"""NVILA's model interfaces without the ``llava`` package: ``LlavaMetaModel`` and ``LlavaMetaForCausalLM``.

``LlavaMetaModel`` owns the three sub-models (LLM, vision tower, projector): loading and saving the
three-folder layout and the image-encoding numerics (dynamic S2). ``LlavaMetaForCausalLM`` owns the
language side: splicing media embeddings into the prompt (``embed_inputs``, VILA's ``_embed``), generation,
KV-cached streaming (``stream_gen``, over the model's :class:`~nvila_quant.model.session.DecodeSession`) and the
timing report (``benchmark``). Concrete classes (``NVILAQwen2``) implement ``init_vlm`` and create the decode
session there.
"""

from __future__ import annotations

import copy
import logging
import os
from abc import ABC, abstractmethod
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from einops import rearrange
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from nvila_quant.errors import CheckpointError, PromptError
from nvila_quant.io import atomic_output_dir, save_state_dict, write_json
from nvila_quant.model import vision
from nvila_quant.model.config import NVILAConfig, load_config
from nvila_quant.model.generation import ChatSession, format_benchmark, timed_run
from nvila_quant.model.media import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    Image,
    Video,
    dynamic_preprocess,
    dynamic_s2_preprocess,
    load_image,
    load_video_frames,
)
from nvila_quant.model.projector import MultimodalProjector
from nvila_quant.model.session import DecodeSession
from nvila_quant.model.static_decode import static_decode_wanted
from nvila_quant.model.tokenizer import IGNORE_INDEX, MEDIA_TOKENS, tokenize_conversation
from nvila_quant.model.vision import VisionTower

__all__ = ["IGNORE_INDEX", "LlavaMetaForCausalLM", "LlavaMetaModel"]

logger = logging.getLogger(__name__)

PromptPart = str | PIL.Image.Image | Image | Video | os.PathLike
Media = dict[str, list[torch.Tensor]]
MediaConfig = dict[str, dict[str, Any]]


class LlavaMetaModel(ABC):
    """The VLM container: ``llm`` (HF causal LM), ``vision_tower`` (:class:`VisionTower`),
    ``mm_projector`` (:class:`MultimodalProjector`), ``tokenizer`` and the media ``encoders``."""

    config: NVILAConfig
    llm: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    vision_tower: VisionTower
    mm_projector: MultimodalProjector
    encoders: dict[str, Any]

    # ------------------------------------------------------------------ construction
    @abstractmethod
    def init_vlm(self, config: NVILAConfig, *args: Any, **kwargs: Any) -> None:
        """Build ``llm``, ``tokenizer``, ``vision_tower``, ``mm_projector`` and ``encoders`` from ``config``."""

    @classmethod
    def load_pretrained(
        cls,
        path_or_config: str | os.PathLike | NVILAConfig,
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ):
        """Load a three-folder NVILA checkpoint (``config.json``, ``llm/``, ``vision_tower/``, ``mm_projector/``).

        ``torch_dtype`` defaults to the checkpoint's ``model_dtype``; ``device`` to CUDA when present.
        Extra keyword arguments go to ``init_vlm``.
        """
        config = load_config(path_or_config)
        return cls(config, torch_dtype=torch_dtype, device=device, **kwargs)

    def save_pretrained(
        self, output_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None, overwrite: bool = False
    ) -> Path:
        """Write the three-folder layout NVIDIA publishes (atomically; refuses an existing folder).

        ``state_dict`` uses this module's keys (``llm.*``, ``vision_tower.vision_tower.*``, ``mm_projector.*``).
        """
        state_dict = state_dict if state_dict is not None else self.state_dict()  # type: ignore[attr-defined]
        parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in ("llm", "vision_tower", "mm_projector")}
        for key, tensor in state_dict.items():
            if key.startswith("llm."):
                parts["llm"][key.removeprefix("llm.")] = tensor
            elif key.startswith("vision_tower.vision_tower."):
                sub = key.removeprefix("vision_tower.vision_tower.")
                parts["vision_tower"][sub if sub.startswith("vision_model.") else f"vision_model.{sub}"] = tensor
            elif key.startswith("mm_projector."):
                parts["mm_projector"][key.removeprefix("mm_projector.")] = tensor
            else:
                raise ValueError(f"state_dict key {key!r} belongs to no sub-model (llm., vision_tower., mm_projector.)")
        llm = self.get_llm()
        if getattr(llm.config, "tie_word_embeddings", False):
            parts["llm"].pop("lm_head.weight", None)
        self.post_config()
        with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
            llm_dir, vt_dir, mp_dir = tmp / "llm", tmp / "vision_tower", tmp / "mm_projector"
            self.save_llm(llm_dir, parts["llm"])
            self.tokenizer.save_pretrained(str(llm_dir))
            save_state_dict(parts["vision_tower"], vt_dir)
            self.get_vision_tower().config.save_pretrained(str(vt_dir))
            if self.get_vision_tower().image_processor is not None:
                self.get_vision_tower().image_processor.save_pretrained(str(vt_dir))
            save_state_dict(parts["mm_projector"], mp_dir)
            write_json(mp_dir / "config.json", self.config.mm_projector_cfg)
            config = copy.deepcopy(self.config)
            config.architectures = [type(self).__name__] if config.architectures is None else config.architectures
            config.extra["_name_or_path"] = str(Path(output_dir).absolute())
            config.extra.setdefault("resume_path", str(Path(output_dir).absolute()))
            config.save(tmp)
        return Path(output_dir)

    def save_llm(self, folder: Path, llm_state_dict: dict[str, torch.Tensor]) -> None:
        """Write ``llm/``: config, generation config and float weights (quantized models override this)."""
        llm = self.get_llm()
        llm.config.save_pretrained(str(folder))
        if getattr(llm, "generation_config", None) is not None:
            llm.generation_config.save_pretrained(str(folder))
        save_state_dict(llm_state_dict, folder)

    # ------------------------------------------------------------------ accessors
    def get_llm(self) -> PreTrainedModel:
        return self.llm

    def get_lm_head(self) -> torch.nn.Module:
        return self.get_llm().get_output_embeddings()

    def get_vision_tower(self) -> VisionTower:
        return self.vision_tower

    def get_mm_projector(self) -> MultimodalProjector:
        return self.mm_projector

    def post_config(self) -> None:
        """Refresh the embedded sub-configs and derived sizes from the live sub-models."""
        llm_cfg = self.get_llm().config.to_dict()
        llm_cfg["_name_or_path"] = "./llm"
        vt_cfg = self.get_vision_tower().config.to_dict()
        vt_cfg["_name_or_path"] = "./vision_tower"
        mp_cfg = dict(self.config.mm_projector_cfg or {})
        mp_cfg.update(self.get_mm_projector().config_dict())
        mp_cfg["_name_or_path"] = "./mm_projector"
        self.config.llm_cfg, self.config.vision_tower_cfg, self.config.mm_projector_cfg = llm_cfg, vt_cfg, mp_cfg
        self.config.hidden_size = self.get_llm().config.hidden_size
        self.config.mm_hidden_size = self.get_vision_tower().hidden_size

    @property
    def device(self) -> torch.device:
        return self.get_llm().get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.get_llm().get_input_embeddings().weight.dtype

    # ------------------------------------------------------------------ S2 numerics
    @staticmethod
    def split_chessboard(x: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
        return vision.split_chessboard(x, nh, nw)

    @staticmethod
    def merge_chessboard(x: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
        return vision.merge_chessboard(x, nh, nw)

    def merge_features_for_dynamic_s2(
        self, image_features: torch.Tensor, block_sizes: list[tuple[int, int] | None]
    ) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        vt = self.get_vision_tower()
        return vision.merge_features_for_dynamic_s2(
            image_features, block_sizes, vt.scales, self.config.s2_resize_output_to_scale_idx
        )

    def encode_images(
        self, images: torch.Tensor, block_sizes: Sequence[tuple[int, int] | None] | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """Tiles -> LLM-space features.

        images: (num_tiles, 3, S, S). Dynamic S2: ``block_sizes`` gives each image's last-scale (rows, cols)
        or None for a single tile; returns one (tokens_i, H) tensor per image (stacked when all equal).
        Otherwise every tile is an image: (num_tiles, tokens, H).
        """
        if not self.config.is_dynamic_s2:
            return self.get_mm_projector()(self.get_vision_tower()(images))
        block_sizes = list(block_sizes) if block_sizes is not None else [None] * len(images)
        features = self.get_vision_tower()(images)  # (tiles, 1024, C)
        merged, new_block_sizes = self.merge_features_for_dynamic_s2(features, block_sizes)
        split = [self.split_chessboard(x, bs[0], bs[1]) for x, bs in zip(merged, new_block_sizes, strict=True)]
        stacked = torch.cat([rearrange(x, "b c h w -> b (h w) c") for x in split], dim=0)  # (B, 1024, 3C)
        projected = self.get_mm_projector()(stacked)  # (B, 256, H)
        per_image = projected.split([bs[0] * bs[1] for bs in new_block_sizes], dim=0)
        out = [
            rearrange(self.merge_chessboard(x, bs[0], bs[1]), "1 c h w -> (h w) c")
            for x, bs in zip(per_image, new_block_sizes, strict=True)
        ]
        if all(f.shape[0] == out[0].shape[0] for f in out):
            return torch.stack(out, dim=0)
        return out


class LlavaMetaForCausalLM(ABC):  # noqa: B024 (a mixin; its abstract side is LlavaMetaModel)
    """Generation over a :class:`LlavaMetaModel`: ``embed_inputs``, ``generate``, ``generate_content``,
    ``prepare_media``, ``stream_gen`` and ``benchmark``. ``decode_session`` holds the KV cache of ``stream_gen`` and
    chat sessions (created by the concrete class's ``init_vlm``)."""

    decode_session: DecodeSession

    # ------------------------------------------------------------------ media
    def prepare_media(self, conversation: list[dict[str, Any]]) -> tuple[Media, MediaConfig]:
        """Load and tile the media in a conversation; rewrite each message's value to text.

        ``conversation``: ``[{"from": "human", "value": str | [str, PIL.Image, Image, Video, Path, ...]}]``.
        Media parts become ``<image>`` / ``<vila/video>`` tokens in the text (in place). Returns
        ``media`` (``{"image": [tile (3,S,S), ...], "video": [(F,3,S,S), ...]}``) and ``media_config``
        (``{"image": {"block_sizes": [(rows, cols)]}}`` for a dynamic-S2 image).
        """
        cfg: NVILAConfig = self.config  # type: ignore[attr-defined]
        raw: dict[str, list[Any]] = defaultdict(list)
        owner: list[int] = []  # message index of each image
        for i, message in enumerate(conversation):
            parts = message.get("value", message.get("content"))
            parts = parts if isinstance(parts, list | tuple) else [parts]
            text = ""
            for part in parts:
                kind = _media_kind(part)
                if kind == "text":
                    for token in MEDIA_TOKENS.values():
                        if token in part:
                            raise PromptError(
                                f"text part {part[:60]!r} contains the media token {token!r}; pass media as "
                                "separate prompt parts, e.g. [Image('photo.jpg'), 'Describe the image.']"
                            )
                    text += part
                elif kind == "image":
                    raw["image"].append(load_image(part))
                    owner.append(i)
                    text += MEDIA_TOKENS["image"]
                else:
                    video = part if isinstance(part, Video) else Video(path=part)
                    raw["video"].append(load_video_frames(video, cfg.num_video_frames, cfg.fps))
                    text += MEDIA_TOKENS["video"]
            message["value"] = text
            message.pop("content", None)

        vt: VisionTower = self.get_vision_tower()  # type: ignore[attr-defined]
        media: Media = {}
        media_config: MediaConfig = defaultdict(dict)
        if raw.get("image"):
            images = raw["image"]
            if len(images) == 1 and cfg.image_aspect_ratio == "dynamic":
                tiles = dynamic_preprocess(images[0], cfg.min_tiles, cfg.max_tiles, vt.image_size)
                msg = conversation[owner[0]]
                msg["value"] = msg["value"].replace(MEDIA_TOKENS["image"], f"{MEDIA_TOKENS['image']}\n" * len(tiles))
                media["image"] = list(self._pixels(tiles))
            elif len(images) == 1 and cfg.is_dynamic_s2:
                tiles, block_size = dynamic_s2_preprocess(images[0], cfg.s2_scales, cfg.max_tiles, vt.image_size)
                media["image"] = list(self._pixels(tiles))
                media_config["image"]["block_sizes"] = [block_size]
            else:
                media["image"] = list(self._pixels(images))
        if raw.get("video"):
            if cfg.video_max_tiles > 1:
                logger.warning("video_max_tiles=%d: frames are encoded as single tiles", cfg.video_max_tiles)
            media["video"] = [self._pixels(frames) for frames in raw["video"]]
        return media, dict(media_config)

    def _pixels(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        """PIL images -> (N, 3, S, S) pixel tiles in the vision tower's dtype and device."""
        vt: VisionTower = self.get_vision_tower()  # type: ignore[attr-defined]
        pixels = vt.image_processor(images, return_tensors="pt")["pixel_values"]
        return pixels.to(device=vt.device, dtype=vt.dtype)

    # ------------------------------------------------------------------ embedding
    def _media_counts(self, media: Media | None, media_config: MediaConfig | None) -> dict[str, int]:
        counts = {}
        for name, items in (media or {}).items():
            if name not in MEDIA_TOKENS:
                raise PromptError(f"unsupported media type {name!r}; expected one of {', '.join(MEDIA_TOKENS)}")
            block_sizes = (media_config or {}).get(name, {}).get("block_sizes")
            if name == "image" and block_sizes is not None:
                tiles = sum(1 if b is None else self._s2_tiles(b) for b in block_sizes)
                if tiles != len(items):
                    raise PromptError(f"block_sizes {block_sizes} need {tiles} image tiles but {len(items)} were given")
                counts[name] = len(block_sizes)
            else:
                counts[name] = len(items)
        return counts

    def _embed_check_no_media(self, input_ids: torch.Tensor) -> None:
        """Raise when ``input_ids`` hold media tokens but no media were given."""
        for name, tid in self.tokenizer.media_token_ids.items():  # type: ignore[attr-defined]
            n = int((input_ids == tid).sum())
            if n:
                raise PromptError(f"the prompt has {n} {MEDIA_TOKENS[name]} token(s) but no {name} was given")

    def _s2_tiles(self, block_size: tuple[int, int]) -> int:
        scales = self.config.s2_scales  # type: ignore[attr-defined]
        return sum((s // scales[0]) ** 2 for s in scales[:-1]) + block_size[0] * block_size[1]

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        media: Media | None,
        media_config: MediaConfig | None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        padding_side: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Splice media embeddings into the token embeddings.

        input_ids: (B, T) with one media token per image / video. Returns ``inputs_embeds`` (B, T', H),
        ``labels`` (B, T') with IGNORE_INDEX at media positions and padding, and ``attention_mask``
        (B, T') bool; sequences are truncated to ``tokenizer.model_max_length`` and padded on
        ``padding_side`` (default: the tokenizer's).
        """
        tokenizer = self.tokenizer  # type: ignore[attr-defined]
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        device = self.device  # type: ignore[attr-defined]
        input_ids = input_ids.to(device)
        labels = labels.to(device) if labels is not None else torch.full_like(input_ids, IGNORE_INDEX)
        attention_mask = (
            attention_mask.to(device=device, dtype=torch.bool)
            if attention_mask is not None
            else torch.ones_like(input_ids, dtype=torch.bool)
        )
        media_token_ids: dict[str, int] = tokenizer.media_token_ids
        by_id = {tid: name for name, tid in media_token_ids.items()}

        # validate before running any encoder
        counts = self._media_counts(media, media_config)
        for name, tid in media_token_ids.items():
            n_tokens = int((input_ids[attention_mask] == tid).sum())
            if n_tokens != counts.get(name, 0):
                raise PromptError(
                    f"the prompt has {n_tokens} {MEDIA_TOKENS[name]} token(s) but {counts.get(name, 0)} "
                    f"{name}(s) were given"
                )

        text_embeds = self.get_llm().get_input_embeddings()(input_ids)  # type: ignore[attr-defined]
        media_embeds: dict[str, deque[torch.Tensor]] = {}
        for name, items in (media or {}).items():
            if items:
                encoded = self.encoders[name](items, (media_config or {}).get(name, {}))  # type: ignore[attr-defined]
                media_embeds[name] = deque(e.to(text_embeds.dtype) for e in encoded)

        inputs, out_labels = [], []
        for k in range(input_ids.shape[0]):
            ids, emb, lab = (input_ids[k][attention_mask[k]], text_embeds[k][attention_mask[k]],
                             labels[k][attention_mask[k]])
            pieces, piece_labels = [], []
            pos = 0
            ids_list = ids.tolist()
            while pos < len(ids_list):
                if ids_list[pos] in by_id:
                    block = media_embeds[by_id[ids_list[pos]]].popleft()
                    pieces.append(block)
                    piece_labels.append(torch.full((block.shape[0],), IGNORE_INDEX, dtype=lab.dtype, device=device))
                    pos += 1
                else:
                    end = pos
                    while end < len(ids_list) and ids_list[end] not in by_id:
                        end += 1
                    pieces.append(emb[pos:end])
                    piece_labels.append(lab[pos:end])
                    pos = end
            inputs.append(torch.cat(pieces, dim=0))
            out_labels.append(torch.cat(piece_labels, dim=0))

        max_len = tokenizer.model_max_length
        if max_len and any(x.shape[0] > max_len for x in inputs):
            logger.warning("inputs longer than model_max_length=%d after inserting media are truncated", max_len)
            inputs = [x[:max_len] for x in inputs]
            out_labels = [x[:max_len] for x in out_labels]
        return self._batchify(inputs, out_labels, padding_side or tokenizer.padding_side)

    def _embed(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """VILA's name of :meth:`embed_inputs` (kept for code written against VILA)."""
        return self.embed_inputs(*args, **kwargs)

    @staticmethod
    def _batchify(
        inputs: list[torch.Tensor], labels: list[torch.Tensor], padding_side: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, hidden = len(inputs), inputs[0].shape[1]
        device = inputs[0].device
        max_len = max(x.shape[0] for x in inputs)
        embeds = inputs[0].new_zeros((batch, max_len, hidden))
        out_labels = torch.full((batch, max_len), IGNORE_INDEX, dtype=labels[0].dtype, device=device)
        mask = torch.zeros((batch, max_len), dtype=torch.bool, device=device)
        for k, (x, lab) in enumerate(zip(inputs, labels, strict=True)):
            n = x.shape[0]
            sl = slice(0, n) if padding_side == "right" else slice(max_len - n, max_len)
            embeds[k, sl], out_labels[k, sl], mask[k, sl] = x, lab, True
        return embeds, out_labels, mask

    # ------------------------------------------------------------------ generation
    @property
    def default_generation_config(self) -> GenerationConfig:
        tokenizer = self.tokenizer  # type: ignore[attr-defined]
        base = getattr(self.get_llm(), "generation_config", None)  # type: ignore[attr-defined]
        config = copy.deepcopy(base) if base is not None else GenerationConfig()
        if tokenizer.eos_token_id is None:
            raise CheckpointError("the tokenizer in llm/ has no EOS token")
        if config.max_new_tokens is None and config.max_length in (None, GenerationConfig().max_length):
            config.max_length = tokenizer.model_max_length
        if config.pad_token_id is None:
            config.pad_token_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                   else tokenizer.eos_token_id)
        if config.bos_token_id is None:
            config.bos_token_id = (tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                                   else tokenizer.eos_token_id)
        config.eos_token_id = list(tokenizer.stop_token_ids)
        return config

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        media: Media | None = None,
        media_config: MediaConfig | None = None,
        attention_mask: torch.Tensor | None = None,
        **generation_kwargs: Any,
    ) -> torch.Tensor:
        """Embed (with media) and run the LLM's own ``generate``; returns the new token ids (B, T_new)."""
        padding_side = "left" if input_ids is not None and input_ids.dim() == 2 and input_ids.shape[0] > 1 else None
        inputs_embeds, _, attention_mask = self.embed_inputs(input_ids, media, media_config, None, attention_mask,
                                                             padding_side)
        generation_kwargs.setdefault("generation_config", self.default_generation_config)
        return self.get_llm().generate(  # type: ignore[attr-defined]
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generation_kwargs
        )

    def prompt_inputs(self, prompt: PromptPart | Sequence[PromptPart]) -> tuple[torch.Tensor, Media, MediaConfig]:
        """A one-turn prompt (str, or list of strings, images and videos) as the chat template's ``input_ids`` (1, T)
        with the generation prompt, and its media and media config."""
        parts = list(prompt) if isinstance(prompt, list | tuple) else [prompt]
        conversation = [{"from": "human", "value": parts}]
        media, media_config = self.prepare_media(conversation)
        input_ids = tokenize_conversation(conversation, self.tokenizer, add_generation_prompt=True)  # type: ignore[attr-defined]
        return input_ids.unsqueeze(0).to(self.device), media, media_config  # type: ignore[attr-defined]

    @torch.inference_mode()
    def generate_content(
        self, prompt: PromptPart | Sequence[PromptPart], generation_config: GenerationConfig | None = None
    ) -> str:
        """Answer a prompt: a string, or a list of strings, PIL images, image paths and videos."""
        input_ids, media, media_config = self.prompt_inputs(prompt)
        generation_config = generation_config or self.default_generation_config
        if generation_config.eos_token_id is None:
            generation_config = copy.deepcopy(generation_config)
            generation_config.eos_token_id = list(self.tokenizer.stop_token_ids)  # type: ignore[attr-defined]
        if (generation_config.num_beams or 1) == 1 and static_decode_wanted(self.device):  # CUDA graph replays
            session = ChatSession(self)
            return "".join(session.stream(input_ids, media, media_config, generation_config)).strip()
        output_ids = self.generate(input_ids, media, media_config, generation_config=generation_config)
        return self.tokenizer.decode(output_ids[0], skip_special_tokens=True).strip()  # type: ignore[attr-defined]

    def stream_content(
        self, prompt: PromptPart | Sequence[PromptPart], generation_config: GenerationConfig | None = None
    ) -> Iterator[str]:
        """Like :meth:`generate_content` but yields text as it is decoded (through ``stream_gen``)."""
        input_ids, media, media_config = self.prompt_inputs(prompt)
        session = ChatSession(self)
        yield from session.stream(input_ids, media, media_config, generation_config or self.default_generation_config)

    # ------------------------------------------------------------------ KV-cached streaming
    @torch.inference_mode()
    def stream_gen(
        self,
        input_ids: torch.Tensor,
        media: Media | None = None,
        media_cfg: MediaConfig | None = None,
        start_pos: int = 0,
        chunk_prefilling: bool = False,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, int]:
        """Run ``input_ids`` (with their media) at position ``start_pos`` over the kept KV cache.

        ``start_pos == 0`` starts a new sequence (fresh cache). ``start_pos > 0`` continues the cached one
        (cropped back to ``start_pos`` if it is longer): one token is a decode step; several tokens (a new
        chat turn, whose media alone are encoded) need ``chunk_prefilling=True``. Returns the logits
        (B, T', V) (the last ``logits_to_keep`` positions when > 0) and T', the number of positions
        processed (media tokens expanded).
        """
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        device = self.device  # type: ignore[attr-defined]
        if media:
            embeds, _, mask = self.embed_inputs(input_ids, media, media_cfg, None, attention_mask, padding_side="left")
        else:
            self._embed_check_no_media(input_ids)
            embeds = self.get_llm().get_input_embeddings()(input_ids.to(device))  # type: ignore[attr-defined]
            mask = (
                attention_mask.to(device=device, dtype=torch.bool)
                if attention_mask is not None
                else torch.ones(input_ids.shape, dtype=torch.bool, device=device)
            )
        logits = self.decode_session.extend(embeds, mask, start_pos, chunk_prefilling, logits_to_keep)
        return logits, embeds.shape[1]

    def reset_cache(self) -> None:
        """Forget the KV cache kept by :meth:`stream_gen`."""
        self.decode_session.reset()

    # ------------------------------------------------------------------ timing
    @torch.inference_mode()
    def benchmark(
        self, prompt: PromptPart | Sequence[PromptPart], max_new_tokens: int = 32, warmup: bool = True,
        quiet: bool = False
    ) -> dict[str, float]:
        """Time vision encoding, time to first token and decode speed for ``prompt``.

        Returns ``{"vision_encode_ms", "prefill_ms", "ttft_ms", "prefill_tokens", "decode_tokens",
        "decode_tokens_per_s"}`` and prints a short table unless ``quiet``.
        """
        input_ids, media, media_config = self.prompt_inputs(prompt)
        if warmup:
            timed_run(self, input_ids, media, media_config, max_new_tokens=2)
        result = timed_run(self, input_ids, media, media_config, max_new_tokens=max_new_tokens)
        if not quiet:
            print(format_benchmark(result))
        return result


def _media_kind(part: Any) -> str:
    if isinstance(part, str):
        return "text"
    if isinstance(part, PIL.Image.Image | Image):
        return "image"
    if isinstance(part, Video):
        return "video"
    if isinstance(part, os.PathLike):
        suffix = Path(part).suffix.lower()
        if suffix in VIDEO_EXTENSIONS or Path(part).is_dir():
            return "video"
        if suffix in IMAGE_EXTENSIONS or Path(part).is_file():
            return "image"
        return "image"  # load_image raises a clear "not found" error
    raise PromptError(
        f"unsupported prompt part of type {type(part).__name__}; use str, PIL.Image, Image(path), Video(path) or Path"
    )
