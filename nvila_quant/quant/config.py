"""``AWQConfig``: every setting of an AWQ (or round-to-nearest) run, validated on construction.

Two presets fill the settings left unset (``None``): ``numerics="fast"`` (the default) turns on the options that
fix the reference's known weaknesses and the cheaper searches; ``numerics="reference"`` reproduces the reference
implementation (llm-awq) numerically, bit for bit as before the presets existed (``docs/awq.md``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch

from nvila_quant.errors import ConfigError
from nvila_quant.machine import cpu_has_bf16
from nvila_quant.model.config import dtype_from_str

__all__ = [
    "BITS",
    "DEFAULT_FORMAT",
    "FORMATS",
    "GROUP_SIZES",
    "METHODS",
    "NUMERICS",
    "PRESETS",
    "RATIO_SEARCHES",
    "DEFAULT_TARGETS",
    "TARGETS",
    "AWQConfig",
    "resolve_device",
    "resolve_dtype",
]

METHODS = ("awq", "rtn")
BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, -1)
TARGETS = ("llm", "projector", "vision_tower")
DEFAULT_TARGETS = ("llm", "projector")
FORMATS = ("autoawq", "compressed-tensors", "tinychat")  # = nvila_quant.formats.checkpoint.FORMATS
DEFAULT_FORMAT = "autoawq"
_DTYPES = ("auto", "float32", "float16", "bfloat16")  # as stored (quant_log.json, the resume fingerprint)
_SHORT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
RATIO_SEARCHES = ("grid", "coarse")
NUMERICS = ("fast", "reference")
# the value each preset gives a setting left as None
PRESETS: dict[str, dict[str, object]] = {
    "reference": dict(duo_scaling=False, grid_include_one=False, gqa_vo=False, quant_input=False,
                      ratio_search="grid", search_tokens=0, gram_loss=False),
    "fast": dict(duo_scaling=True, grid_include_one=True, gqa_vo=True, quant_input=True,
                 ratio_search="coarse", search_tokens=4096, gram_loss=True),
}


@dataclass
class AWQConfig:
    """Settings of one quantization run.

    Args:
        numerics: "fast" or "reference": the preset that fills every setting below left as None (``PRESETS``);
            "reference" is llm-awq's arithmetic, "fast" adds the four options and the cheaper searches.
        method: "awq" (scale + clip search) or "rtn" (round to nearest, no calibration).
        bits / group_size / zero_point: the weight quantizer (group_size -1 = one group per output channel).
        targets: sub-models to quantize: "llm" (every Linear in the decoder blocks), "projector" (both int4, AWQ)
            and/or "vision_tower" (W8A8 with SmoothQuant, :mod:`nvila_quant.quant.vision`; needs image samples and
            the compressed-tensors format, the one that states int8 activations).
        format: packed checkpoint format written to the output.
        n_samples: calibration conversations (image + caption, or text only).
        seqlen: tokens kept per conversation (longer ones are truncated, with a warning).
        text_ratio: fraction of the samples that are text-only.
        seed: sample selection and prompt choice.
        duo_scaling: s = x_mean^r / w_mean^(1-r) (AutoAWQ's option) instead of s = x_mean^r.
        grid_include_one: also try ratio 1.0 (the reference stops at 0.95).
        gqa_vo: GQA-aware v_proj -> o_proj group (the reference skips it when the shapes differ).
        quant_input: feed each block (and the LLM, after the projector) the quantized output of the previous
            one instead of the full-precision output.
        clip: run the clip search (reference: on).
        ratio_search: "grid" (every ratio, the reference) or "coarse" (every ``COARSE_STEP``-th ratio, then every
            ratio between the best one's coarse neighbours: the grid's minimum wherever the loss is unimodal
            between coarse points).
        search_tokens: tokens the scale search's losses use, a seeded random subset of the calibration tokens
            (0 = every token); the statistics (mean |x|) always use every token.
        gram_loss: where the inspected module is the group's single linear (v -> o, up -> down), compute its loss
            as the quadratic form of the weight error with the inputs' Gram matrix X^T X (every calibration
            token), whenever that is cheaper than the forward (fewer input features than search tokens).
        n_grid: grid points of the scale search (ratios i / n_grid) and denominator of the clip grid.
        max_shrink: the clip search tries max_val = absmax * (1 - i / n_grid) for i < max_shrink * n_grid.
        clip_tokens: tokens sub-sampled (stride n_tokens // clip_tokens) for the clip search.
        clip_batch: output channels per clip-search batch (memory bound; does not change results).
        quantize_lm_head: also quantize ``lm_head`` (the final RMSNorm -> lm_head scale group, searched like a
            block's) and write ``"lm_head": true``; a tied head is untied (embed_tokens stays float).
        lm_head_tokens: calibration tokens (a seeded random subset) the lm_head's scale and clip searches use.
        vision_tiles: calibration tiles (a seeded subset of the image samples' tiles) the tower's W8A8 runs on.
        vision_max_error: a tower linear whose relative W8A8 output error stays above this is kept float.
        chunk_tokens: tokens per chunk in loss evaluation of token-wise modules (memory bound only).
        device: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N".
        dtype: compute dtype of the search, "auto", "fp32", "fp16" or "bf16" (stored as "float32", ...); "auto" =
            fp16 on CUDA (as the reference); on CPU fp32, or bf16 with ``numerics="fast"`` on CPUs that multiply
            bf16 natively (AVX-512 BF16, AMX). Losses are accumulated in fp32 either way.
    """

    numerics: str = "fast"
    method: str = "awq"
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    targets: tuple[str, ...] = DEFAULT_TARGETS
    format: str = DEFAULT_FORMAT
    n_samples: int = 32
    seqlen: int = 4096
    text_ratio: float = 0.25
    seed: int = 42
    duo_scaling: bool | None = None
    grid_include_one: bool | None = None
    gqa_vo: bool | None = None
    quant_input: bool | None = None
    clip: bool = True
    ratio_search: str | None = None
    search_tokens: int | None = None
    gram_loss: bool | None = None
    n_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512
    clip_batch: int = 256
    chunk_tokens: int = 4096
    quantize_lm_head: bool = False
    lm_head_tokens: int = 4096
    vision_tiles: int = 16
    vision_max_error: float = 0.05
    device: str = "auto"
    dtype: str = "auto"
    version: int = field(default=1)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        if self.numerics not in NUMERICS:
            raise ConfigError(f"numerics must be one of {NUMERICS}, got {self.numerics!r}")
        for name, value in PRESETS[self.numerics].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.ratio_search not in RATIO_SEARCHES:
            raise ConfigError(f"ratio_search must be one of {RATIO_SEARCHES}, got {self.ratio_search!r}")
        if int(self.search_tokens) < 0:
            raise ConfigError(f"search_tokens must be >= 0 (0 = every token), got {self.search_tokens}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.bits not in BITS:
            raise ConfigError(f"bits must be one of {BITS}, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(f"group_size must be one of {GROUP_SIZES} (-1 = per output channel), "
                              f"got {self.group_size}")
        bad = [t for t in self.targets if t not in TARGETS]
        if not self.targets or bad or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"targets must be a non-empty subset of {TARGETS} without repeats, got {self.targets}")
        if self.quantize_lm_head and "llm" not in self.targets:
            raise ConfigError(f"quantize_lm_head quantizes the LLM's head: add 'llm' to targets (got {self.targets})")
        if self.format not in FORMATS:
            raise ConfigError(f"format must be one of {FORMATS}, got {self.format!r}")
        if "vision_tower" in self.targets:
            if self.format != "compressed-tensors":
                raise ConfigError(f"the vision tower is quantized W8A8 (int8 activations), which only the "
                                  f"compressed-tensors format states; {self.format!r} cannot: use --format "
                                  "compressed-tensors or drop 'vision_tower' from --targets")
            if self.method != "awq":
                raise ConfigError("the vision tower's W8A8 searches its smoothing on calibration images: it runs "
                                  "with awq, not rtn")
            if self.vision_tiles < 1 or self.vision_max_error <= 0:
                raise ConfigError(f"vision_tiles must be >= 1 and vision_max_error > 0, got {self.vision_tiles} and "
                                  f"{self.vision_max_error}")
        for name in ("n_samples", "seqlen", "n_grid", "clip_tokens", "clip_batch", "chunk_tokens", "lm_head_tokens"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.text_ratio <= 1.0:
            raise ConfigError(f"text_ratio must be in [0, 1], got {self.text_ratio}")
        if not 0.0 < self.max_shrink < 1.0:
            raise ConfigError(f"max_shrink must be in (0, 1), got {self.max_shrink}")
        self.dtype = _SHORT_DTYPES.get(self.dtype, self.dtype)
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of auto, fp32, fp16, bf16 (or float32, float16, bfloat16), "
                              f"got {self.dtype!r}")
        dev = str(self.device)
        if dev not in ("auto", "cpu", "cuda") and not dev.startswith("cuda:"):
            raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {dev!r}")

    # ------------------------------------------------------------------ derived
    @property
    def ratios(self) -> list[float]:
        """Scale-search grid: i / n_grid for i = 0 .. n_grid - 1 (.. n_grid with ``grid_include_one``)."""
        last = self.n_grid + 1 if self.grid_include_one else self.n_grid
        return [i / self.n_grid for i in range(last)]

    @property
    def is_reference(self) -> bool:
        """Every setting that changes results is the reference's (llm-awq's arithmetic)."""
        return all(getattr(self, k) == v for k, v in PRESETS["reference"].items())

    @property
    def symmetric(self) -> bool:
        return not self.zero_point

    def to_dict(self) -> dict:
        out = asdict(self)
        out["targets"] = list(self.targets)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> AWQConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown AWQConfig fields {unknown}; expected some of {sorted(known)}")
        if "numerics" not in data:  # written before the presets: its unset settings were the reference's
            data = {"numerics": "reference", **data}
        return cls(**data)

    def search_fingerprint(self) -> dict:
        """The fields that change results (used to refuse resuming a run made with other settings)."""
        skip = {"clip_batch", "chunk_tokens", "device"}
        if not self.quantize_lm_head:  # as before the option existed: earlier work folders still resume
            skip |= {"quantize_lm_head", "lm_head_tokens"}
        if "vision_tower" not in self.targets:
            skip |= {"vision_tiles", "vision_max_error"}
        if self.is_reference:  # as before the presets existed
            skip |= {"numerics", "ratio_search", "search_tokens", "gram_loss"}
        return {k: v for k, v in self.to_dict().items() if k not in skip}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device, numerics: str = "reference") -> torch.dtype:
    """The compute dtype: ``dtype`` unless "auto" (fp16 on CUDA; on CPU fp32, or bf16 for the fast numerics on
    CPUs with native bf16)."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if numerics == "fast" and cpu_has_bf16() else torch.float32
    return dtype_from_str(dtype)
