"""Oracle of the awq -> awq_marlin kernel choice in vLLM and SGLang, per checkpoint and per layer.

Facts (read, not copied) from vllm-project/vllm:
- ``layers/quantization/awq_marlin.py``: ``AWQMarlinConfig.is_awq_marlin_compatible`` (called by
  ``override_quantization_method``) needs ``quant_method == "awq"`` (lower-cased), ``bits``, ``group_size`` and
  ``zero_point`` all present, ``bits`` in {4, 8}, then ``check_marlin_supported(TYPE_MAP[bits], group_size,
  has_zp=zero_point)``. ``get_quant_method`` falls back to plain AWQ for a layer when ``check_marlin_supports_layer``
  fails.
- ``layers/quantization/utils/marlin_utils.py``: ``query_marlin_supported_quant_types`` returns nothing below
  sm75 (SGLang's copy: sm80); with zero points only ``uint4``, without only the biased types (uint4b8, uint8b128,
  fp8, fp4), so AWQ needs 4 bits AND zero points. ``MARLIN_SUPPORTED_GROUP_SIZES = [-1, 32, 64, 128]``.
  ``verify_marlin_supports_shape``: N per partition % 64 (``GPTQ_MARLIN_MIN_THREAD_N``), K per partition % 128
  (``GPTQ_MARLIN_MIN_THREAD_K``), and K per partition % group_size when group_size < K.
- sgl-project/sglang ``python/sglang/srt/layers/quantization/awq.py`` / ``marlin_utils.py``: same rules, sm80.
"""

from __future__ import annotations

__all__ = [
    "MARLIN_GROUP_SIZES",
    "MIN_SM",
    "MIN_THREAD_K",
    "MIN_THREAD_N",
    "ROW_PARALLEL",
    "check_awq_marlin",
    "config_reasons",
    "layer_reasons",
]

MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MIN_THREAD_N = 64  # N (output features) per tensor-parallel partition must be a multiple of this
MIN_THREAD_K = 128  # K (input features) per partition must be a multiple of this
MIN_SM = {"vllm": 75, "sglang": 80}
ROW_PARALLEL = ("o_proj", "down_proj")  # RowParallelLinear: K is split across ranks; every other linear splits N


def config_reasons(quant_config: dict, *, sm: int, min_sm: int) -> list[str]:
    """Reasons the whole checkpoint is not converted to awq_marlin (empty: it is)."""
    reasons = []
    method = str(quant_config.get("quant_method", "")).lower()
    if method != "awq":
        reasons.append(f"quant_method is {quant_config.get('quant_method')!r}, not 'awq'")
    missing = [key for key in ("bits", "group_size", "zero_point") if quant_config.get(key) is None]
    if missing:
        reasons.append(f"quantization_config lacks {missing}: awq_marlin needs bits, group_size and zero_point")
    bits, group_size, zero_point = (quant_config.get(k) for k in ("bits", "group_size", "zero_point"))
    if bits is not None and zero_point is not None and not (bits == 4 and zero_point):
        reasons.append(f"marlin's zero-point (AWQ) path takes uint4 with zero points only, "
                       f"got bits={bits}, zero_point={zero_point}")
    if group_size is not None and group_size not in MARLIN_GROUP_SIZES:
        reasons.append(f"group_size {group_size} not in marlin's {list(MARLIN_GROUP_SIZES)}")
    if sm < min_sm:
        reasons.append(f"GPU sm{sm} is below marlin's minimum sm{min_sm}")
    return reasons


def layer_reasons(name: str, shape: tuple[int, int], group_size: int, tp: int = 1) -> list[str]:
    """Reasons one (N, K) linear falls back from marlin to plain awq at tensor-parallel size ``tp``."""
    n, k = shape
    row_parallel = name.rsplit(".", 1)[-1] in ROW_PARALLEL
    if row_parallel:
        if k % tp:
            return [f"{name}: K={k} does not split over tp={tp}"]
        n_part, k_part = n, k // tp
    else:
        if n % tp:
            return [f"{name}: N={n} does not split over tp={tp}"]
        n_part, k_part = n // tp, k
    reasons = []
    if n_part % MIN_THREAD_N:
        reasons.append(f"{name}: N per partition {n_part} (N={n}, tp={tp}) is not a multiple of {MIN_THREAD_N} "
                       "-> plain awq fallback")
    if k_part % MIN_THREAD_K:
        reasons.append(f"{name}: K per partition {k_part} (K={k}, tp={tp}) is not a multiple of {MIN_THREAD_K} "
                       "-> plain awq fallback")
    if group_size not in (-1, None) and group_size < k and k_part % group_size:
        reasons.append(f"{name}: K per partition {k_part} is not a multiple of group_size {group_size} "
                       "-> plain awq fallback, which needs it too (ValueError at load)")
    return reasons


def check_awq_marlin(
    quant_config: dict, shapes: dict[str, tuple[int, int]], *, sm: int, min_sm: int, tp: int = 1
) -> list[str]:
    """Reasons an ``awq`` checkpoint would not be served (entirely) by awq_marlin; empty list = every layer is.

    ``shapes`` maps the engine's layer names (fused ``qkv_proj`` / ``gate_up_proj`` where the engine fuses) to
    the full (N, K) of each quantized linear; ``min_sm`` is 75 for vLLM, 80 for SGLang. Checkpoint-level reasons
    come first; per-layer shape fallbacks follow, one or more per failing layer, each naming it.
    """
    reasons = config_reasons(quant_config, sm=sm, min_sm=min_sm)
    if reasons:
        return reasons
    group_size = quant_config["group_size"]
    for name, shape in shapes.items():
        reasons += layer_reasons(name, shape, group_size, tp)
    return reasons
