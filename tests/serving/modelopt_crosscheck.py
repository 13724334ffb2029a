"""Cross-check of ``nvila_quant.formats.modelopt.pack`` against NVIDIA ModelOpt's own ``to_quantized_weight``.

Not part of the test suite (ModelOpt is no dependency of the project). Run it in a separate environment that has
``nvidia-modelopt`` next to the CPU torch, with this repository on the path::

    python3 -m venv /tmp/mo && /tmp/mo/bin/pip install torch==2.13.0 nvidia-modelopt requests huggingface_hub
    PYTHONPATH=. /tmp/mo/bin/python tests/serving/modelopt_crosscheck.py

For seeded symmetric weights of several shapes and group sizes it feeds ModelOpt the dequantized weight and the
same per-group scales (``to_quantized_weight(w, s, "int4_awq", block_size=G)`` rounds w / s back to the codes) and
requires the packed bytes to equal ours, then also packs the raw float weight with ModelOpt's scales and counts the
bytes that differ (ModelOpt's own rounding vs ours).
Prints one line per case and exits non-zero on any mismatch.
"""

from __future__ import annotations

import sys

import modelopt
import torch
from modelopt.torch.export.quant_utils import to_quantized_weight

from nvila_quant.formats import modelopt as ours
from nvila_quant.numerics.qtensor import QTensor

CASES = [(8, 128, 128), (64, 256, 128), (96, 640, 64), (256, 256, 128), (130, 384, 128)]  # (N, K, G)


def main() -> int:
    bad = 0
    for n, k, g in CASES:
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k + g))
        qt = QTensor.from_float(w, 4, g, zero_point=False, scale_dtype=torch.float32)
        mine = ours.pack(qt)["weight"].view(torch.uint8)  # (N/2, K)
        deq = qt.dequantize(torch.float32)  # (q - 8) * s: ModelOpt's round(w / s) gives back q - 8
        theirs = to_quantized_weight(deq, qt.scale, "int4_awq", block_size=g).view(torch.uint8)
        same_codes = torch.equal(mine, theirs)
        # ModelOpt on the raw weight with our scales: its own rounding of w / s (clamped to [-8, 7])
        raw = to_quantized_weight(w, qt.scale, "int4_awq", block_size=g).view(torch.uint8)
        raw_diff = int((raw != mine).sum())
        ok = same_codes and tuple(theirs.shape) == (n // 2, k)
        bad += not ok
        print(f"N={n} K={k} G={g}: packed bytes {'equal' if same_codes else 'DIFFER'} "
              f"(shape {tuple(theirs.shape)} {theirs.dtype}); raw-weight rounding differs in {raw_diff} bytes")
    print(f"modelopt {modelopt.__version__}, torch {torch.__version__}: {'all equal' if not bad else f'{bad} failed'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
