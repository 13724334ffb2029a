"""Functions of the built-in local lmms-eval tasks (``nvq_mc``, ``nvq_vqa``, ``nvq_choice``).

Prompts, answer parsing and metrics are lmms-eval's own (MMMU's and TextVQA's task utilities, imported here so the
task files can name them); this file only opens each row's image: from an ``images/`` folder beside it (a copy of
the folder made self-contained), else from ``../eval`` (the package's held-out images, where the folder ships).
"""

from pathlib import Path

from lmms_eval.tasks.mmmu.utils import mmmu_aggregate_results, mmmu_doc_to_text, mmmu_process_results
from lmms_eval.tasks.textvqa.utils import textvqa_doc_to_text, textvqa_process_results
from PIL import Image

__all__ = ["doc_to_visual", "mmmu_aggregate_results", "mmmu_doc_to_text", "mmmu_process_results",
           "textvqa_doc_to_text", "textvqa_process_results"]

HERE = Path(__file__).resolve().parent
IMAGES = HERE / "images" if (HERE / "images").is_dir() else HERE.parent / "eval"


def doc_to_visual(doc: dict) -> list:
    """The row's image (RGB), as lmms-eval's MMMU and TextVQA tasks give theirs."""
    with Image.open(IMAGES / doc["image"]) as image:
        return [image.convert("RGB")]
