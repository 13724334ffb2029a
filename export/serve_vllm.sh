#!/usr/bin/env bash
# Serve the LLM of an NVILA checkpoint with vLLM. vLLM has no NVILA class: only the language model is served
# (text in, text out); use serve_sglang.sh or serve_trtllm.sh for images.
#   export/serve_vllm.sh MODEL [extra `vllm serve` flags...]
# MODEL: either layout; its llm/ (three folders) is a plain Qwen2 folder (AutoAWQ -> awq_marlin on sm75+).
set -euo pipefail
model=${1:?usage: $0 MODEL [vllm serve flags...]}
shift
layout=$(nvila-quant info "$model" --json | python -c 'import json,sys; print(json.load(sys.stdin)["layout"])')
if [ "$layout" != vila ]; then
  folders="${model%/}-vila"
  [ -d "$folders" ] || nvila-quant convert --model "$model" --to vila --output "$folders"
  model=$folders
fi
exec vllm serve "${model%/}/llm" "$@"
