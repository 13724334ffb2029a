#!/usr/bin/env bash
# Serve an NVILA / NVILA-Lite checkpoint with SGLang (images and video; int4 through awq_marlin on sm80+).
#   export/serve_sglang.sh MODEL [TP] [extra sglang.launch_server flags...]
# MODEL: a float or quantized checkpoint in either layout; a three-folder one is converted to the flat -hf layout
# SGLang loads (MODEL-hf, once). Needs SGLang installed on a CUDA machine.
set -euo pipefail
model=${1:?usage: $0 MODEL [TP] [launch_server flags...]}
tp=${2:-1}
shift $(( $# > 1 ? 2 : 1 ))
layout=$(nvila-quant info "$model" --json | python -c 'import json,sys; print(json.load(sys.stdin)["layout"])')
if [ "$layout" != hf ]; then
  flat="${model%/}-hf"
  [ -d "$flat" ] || nvila-quant convert --model "$model" --to hf --output "$flat"
  model=$flat
fi
exec python -m sglang.launch_server --model-path "$model" --trust-remote-code --tp "$tp" "$@"
