"""The entry point lmms-eval reads (group ``lmms_eval.models``): registers the model ``nvila_quant``.

Kept free of heavy imports: lmms-eval loads every registered entry point while it builds its model registry.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MODEL_ID", "manifest"]

MODEL_ID = "nvila_quant"


def manifest() -> Any:
    """lmms-eval's ``ModelManifest`` for :class:`nvila_quant.eval.adapter.NVILAQuant`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="nvila_quant.eval.adapter.NVILAQuant")
