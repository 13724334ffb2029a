"""Every ``NVILA_QUANT_CUDA_*`` knob of the CUDA backend in one object, read from the environment when first used."""

from __future__ import annotations

from dataclasses import dataclass

from nvila_quant.settings import Lazy, Settings, knob

__all__ = ["CudaSettings", "cuda_settings"]


@dataclass
class CudaSettings(Settings):
    """CUDA backend knobs (variable in each field's declaration)."""

    # up to this many tokens the tensor-core skinny GEMM runs on mma-layout weights (weights read once per 32 tokens)
    mma_max_tokens: int = knob("NVILA_QUANT_CUDA_MMA_MAX_TOKENS", 32, int, minimum=0)
    # K slices of the mma kernels (0: chosen per call from the SM count)
    ksplit: int = knob("NVILA_QUANT_CUDA_KSPLIT", 0, int, minimum=0)
    # warps per CTA of the skinny kernel, 8 or 16 (0: 16 up to 16 tokens, else 8)
    mma_warps: int = knob("NVILA_QUANT_CUDA_MMA_WARPS", 0, int, choices=(0, 8, 16))
    # many tokens: "dequant" (dequantize + cuBLAS) or "fused" (the tiled mma GEMM / the nibble-row GEMM; unmeasured)
    gemm: str = knob("NVILA_QUANT_CUDA_GEMM", "dequant", str, choices=("dequant", "fused"))


cuda_settings = Lazy(CudaSettings)
