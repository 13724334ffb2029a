"""Calibration data: sources (builtin, coco, folder, jsonl) -> chat-template conversations -> LLM inputs."""

from nvila_quant.calibration.embed import CalibrationSet, EmbeddedSample, embed_samples, replay
from nvila_quant.calibration.samples import CalibSample, build_samples
from nvila_quant.calibration.sources import CalibrationError, CalibRecord, check_images, load_records

__all__ = [
    "CalibRecord",
    "CalibSample",
    "CalibrationError",
    "CalibrationSet",
    "EmbeddedSample",
    "build_samples",
    "check_images",
    "embed_samples",
    "load_records",
    "replay",
]
