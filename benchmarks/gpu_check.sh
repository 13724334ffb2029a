#!/bin/sh
# Everything that needs a GPU, in one short run (for a lent GPU machine with a CUDA build of torch on PATH's python):
#   sh benchmarks/gpu_check.sh            # from the repository root
# 1. the GPU tests (`pytest -m cuda`: kernels vs the reference with poisoned outputs, the known-answer self-check,
#    torch.compile / CUDA-graph capture, CUDA-graph decode, the quantized model end to end);
# 2. benchmarks/kernels.py --skip-cpu (GEMV/GEMM vs fp16 cuBLAS, bandwidth fraction, nibble-row GEMV, same run);
# 3. benchmarks/decode.py --spec 7b-stack (int4 vs fp16 decode, CUDA graphs), then the eager loop for comparison
#    (WITH_COMPILED=1: also torch.compile-d decode steps).
# Result files go to benchmarks/results/<benchmark>/ (one per run) and, when $OUT is set, this run's are copied there
# as $OUT/benchmarks/results/<benchmark>/... (commit them to the repository). Kernel builds are cached under
# $NVILA_QUANT_CACHE (default here: /tmp/nqcache).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NVILA_QUANT_CACHE="${NVILA_QUANT_CACHE:-/tmp/nqcache}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY="${PYTHON:-python}"
status=0
MARK=$(mktemp)  # result files newer than this are this run's
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -m pytest -q -m cuda -p no:cacheprovider tests/ || status=1
"$PY" benchmarks/kernels.py --skip-cpu --repeats 5 || status=1
"$PY" benchmarks/decode.py --spec 7b-stack --repeats 3 || status=1
"$PY" benchmarks/decode.py --spec 7b-stack --repeats 2 --decode-tokens 16 --decode-mode dynamic || status=1
if [ "${WITH_COMPILED:-0}" = 1 ]; then  # torch.compile-d decode steps (a compile per model: minutes)
    "$PY" benchmarks/decode.py --spec 7b-stack --repeats 3 --decode-mode compiled --skip-bf16 || status=1
fi
if [ -n "${OUT:-}" ]; then
    find benchmarks/results -name '*.json' -newer "$MARK" -exec cp --parents {} "$OUT"/ \; 2>/dev/null || true
fi
rm -f "$MARK"
exit $status
