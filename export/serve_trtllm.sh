#!/usr/bin/env bash
# Run an NVILA checkpoint with TensorRT-LLM's PyTorch backend (int4: ModelOpt W4A16_AWQ, symmetric, sm80+).
#   export/serve_trtllm.sh MODEL TRTLLM_REPO [extra quickstart_multimodal.py flags...]
# MODEL: float, or quantized with --no-zero-point (asymmetric int4 is refused: TensorRT-LLM's W4A16_AWQ has no zero
# points); either layout. It is converted once to MODEL-trtllm. TRTLLM_REPO: a TensorRT-LLM checkout (examples/).
set -euo pipefail
model=${1:?usage: $0 MODEL TRTLLM_REPO [flags...]}
repo=${2:?usage: $0 MODEL TRTLLM_REPO [flags...]}
shift 2
out="${model%/}-trtllm"
[ -d "$out" ] || nvila-quant convert --model "$model" --to trtllm --output "$out"
exec python "$repo/examples/llm-api/quickstart_multimodal.py" --model_dir "$out" --model_type vila "$@"
