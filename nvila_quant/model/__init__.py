"""The NVILA runtime: load, encode media (dynamic S2 / dynamic tiling), generate and stream."""

from nvila_quant.model.config import NVILAConfig
from nvila_quant.model.generation import ChatSession
from nvila_quant.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel
from nvila_quant.model.media import Image, Video
from nvila_quant.model.nvila import NVILAQwen2
from nvila_quant.model.session import DecodeSession

__all__ = ["ChatSession", "DecodeSession", "Image", "LlavaMetaForCausalLM", "LlavaMetaModel", "NVILAConfig",
           "NVILAQwen2", "Video"]
