"""The onnxruntime-optimized vision tower: ``vision_tower.ort.onnx``, derived from the portable graph.

The dynamo exporter writes SigLIP's attention (opset < 23) as ~20 standard ops that materialize the
``[tiles, heads, T, T]`` score tensor, and its tanh-GELU as 8 element-wise ops; onnxruntime's load-time
optimizer fuses neither. onnxscript's onnxruntime rewrite rules turn them into ``com.microsoft``
``MultiHeadAttention`` (q/k/v biases folded in; on CPU it runs MLAS flash attention, no score tensor) and
``FastGelu``. The result is exact to float rounding (verified like every graph) but onnxruntime-only: TensorRT
builds from the portable ``vision_tower.onnx``. Both files read the same weights (``vision_tower.onnx.data``);
the few tensors the rewrite creates (concatenated q/k/v biases) are stored inside the new graph.

Deliberately left out, measured slower on onnxruntime 1.31 CPU: the packed-QKV ``Attention`` op (unfused
attention inside) and ``SkipLayerNormalization`` (slower than ``Add`` + ``LayerNormalization``).
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Any

__all__ = ["ORT_SUFFIX", "FUSED_OPS", "optimize_for_onnxruntime"]

logger = logging.getLogger(__name__)

ORT_SUFFIX = ".ort.onnx"
FUSED_OPS = ("MultiHeadAttention", "FastGelu", "BiasGelu", "Gelu")


def _fusions() -> list[tuple[str, Any]]:
    """onnxscript's rewrite steps, in the order its own ``fuse_xformers`` applies them (subset, see above)."""
    from onnxscript.rewriter.ort_fusions.bias_gelu import fuse_bias_gelu
    from onnxscript.rewriter.ort_fusions.gelu import fuse_gelu
    from onnxscript.rewriter.ort_fusions.mha import fuse_mha1, fuse_mha2
    from onnxscript.rewriter.ort_fusions.mha_bias import fuse_mha_bias
    from onnxscript.rewriter.ort_fusions.mha_scale import fuse_mha_scale
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
    from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha

    return [("sdpa", fuse_sdpa), ("mha1", fuse_mha1), ("mha2", fuse_mha2), ("mha_scale", fuse_mha_scale),
            ("mha_bias", fuse_mha_bias), ("gelu", fuse_gelu), ("bias_gelu", fuse_bias_gelu),
            ("sdpa_via_mha", replace_sdpa_by_mha)]


def _rewrite(model: Any) -> dict[str, int]:
    import onnx_ir.passes.common as common_passes
    from onnxscript import optimizer
    from onnxscript.rewriter.ort_fusions import shape_optimization

    common_passes.ShapeInferencePass()(model)
    optimizer.optimize(model)  # constant folding below onnxscript's size limits: weights are not touched
    shape_optimization.rules.apply_to_model(model)
    optimizer.optimize(model)
    counts = {}
    for name, fuse in _fusions():
        kwargs = {"apply_shape_inference": True} if name == "sdpa" else {}
        counts[name] = int(fuse(model, **kwargs))
    optimizer.optimize(model)  # inline leftover fusion functions, drop dead nodes
    common_passes.ShapeInferencePass()(model)
    return counts


def optimize_for_onnxruntime(portable: Path, layers: int) -> dict[str, Any] | None:
    """Write ``<name>.ort.onnx`` next to the portable tower graph ``portable``; returns what was fused.

    Returns None (and writes nothing) when the rewrite fuses no attention (e.g. an opset-23 export, whose
    portable graph already holds the standard fused ``Attention`` op) or cannot run (onnxscript without these
    rules); the runtime then uses the portable graph.
    """
    try:
        import onnx_ir as ir

        model = ir.load(portable)  # weights stay lazy references into <portable>.data
        rules = _rewrite(model)
    except Exception as e:  # optional speed-up: never fail an export over it
        logger.warning("onnxruntime graph optimization skipped (%s: %s); the runtime uses %s",
                       type(e).__name__, str(e)[:300], portable.name)
        return None
    ops = collections.Counter(n.op_type for n in model.graph if n.domain == "com.microsoft")
    fused = {op: ops[op] for op in FUSED_OPS if ops[op]}
    if not fused.get("MultiHeadAttention"):
        logger.info("no attention to fuse in %s (already a fused op, or an unknown pattern): no %s written",
                    portable.name, ORT_SUFFIX)
        return None
    if fused["MultiHeadAttention"] != layers:
        logger.warning("fused %d of %d attention layers into MultiHeadAttention", fused["MultiHeadAttention"], layers)
    path = portable.with_name(portable.name.removesuffix(".onnx") + ORT_SUFFIX)
    ir.save(model, path)  # external tensors keep their location: <portable>.data is shared, not copied
    return {"fused_ops": fused, "rules_applied": {k: v for k, v in rules.items() if v}, "path": path}
