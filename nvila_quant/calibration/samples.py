"""Records -> calibration conversations in the model's chat template.

An image sample is ``human: [image, instruction]`` then ``gpt: caption`` (the caption is the assistant
turn, so the LLM is calibrated on the visual tokens followed by text about them); a text-only sample is
``human: instruction`` then ``gpt: text``. ``text_ratio`` of the samples are text-only.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvila_quant.calibration.sources import CalibrationError, CalibRecord
from nvila_quant.model.media import Image

__all__ = ["IMAGE_PROMPTS", "TEXT_PROMPTS", "CalibSample", "build_samples"]

logger = logging.getLogger(__name__)

IMAGE_PROMPTS = (
    "Describe the image briefly.",
    "What is shown in this picture?",
    "Write a short caption for this image.",
    "Describe this photo in one sentence.",
)
TEXT_PROMPTS = (
    "Write a few sentences about anything.",
    "Tell me something interesting.",
    "Continue with a short passage.",
)


@dataclass
class CalibSample:
    """One calibration conversation (VILA messages; image parts are PIL images or ``Image(path)``)."""

    conversation: list[dict[str, Any]]
    kind: str  # "image" or "text"
    origin: str

    def fresh_conversation(self) -> list[dict[str, Any]]:
        """A copy safe to hand to ``prepare_media`` (which rewrites messages in place)."""
        return [{**m, "value": list(m["value"]) if isinstance(m["value"], list) else m["value"]}
                for m in self.conversation]


def _image_sample(r: CalibRecord, prompt: str) -> CalibSample:
    image = Image(r.image) if isinstance(r.image, Path) else r.image
    conv = [{"from": "human", "value": [image, prompt]}, {"from": "gpt", "value": r.text}]
    return CalibSample(conv, "image", r.origin)


def _text_sample(r: CalibRecord, prompt: str) -> CalibSample:
    return CalibSample([{"from": "human", "value": prompt}, {"from": "gpt", "value": r.text}], "text", r.origin)


def build_samples(records: list[CalibRecord], n_samples: int, text_ratio: float, seed: int = 42) -> list[CalibSample]:
    """Pick ``n_samples`` conversations, ``round(n_samples * text_ratio)`` of them text-only (seeded).

    When a kind runs short the other tops up; fewer than asked is a warning, none an error.
    """
    rng = random.Random(seed)
    images = [r for r in records if r.image is not None]
    texts = [r for r in records if r.image is None]
    rng.shuffle(images)
    rng.shuffle(texts)
    n_text = round(n_samples * text_ratio)
    n_image = n_samples - n_text
    take_img, take_txt = min(n_image, len(images)), min(n_text, len(texts))
    spare = n_samples - take_img - take_txt
    if spare and text_ratio < 1.0:
        extra = min(spare, len(images) - take_img)
        take_img, spare = take_img + extra, spare - extra
    if spare and text_ratio > 0.0:
        extra = min(spare, len(texts) - take_txt)
        take_txt, spare = take_txt + extra, spare - extra
    if take_img + take_txt == 0:
        kinds = "text-only" if text_ratio == 1.0 else "image" if text_ratio == 0.0 else "image or text"
        raise CalibrationError(
            f"no {kinds} calibration samples: the source has {len(images)} image and {len(texts)} text records "
            f"and text_ratio={text_ratio}"
        )
    if take_img + take_txt < n_samples or take_img != n_image:
        logger.warning(
            "calibration: asked for %d samples (%d image, %d text); using %d image + %d text-only "
            "(the source has %d image and %d text records)",
            n_samples, n_image, n_text, take_img, take_txt, len(images), len(texts),
        )
    samples = [_image_sample(r, rng.choice(IMAGE_PROMPTS)) for r in images[:take_img]]
    samples += [_text_sample(r, rng.choice(TEXT_PROMPTS)) for r in texts[:take_txt]]
    return samples
