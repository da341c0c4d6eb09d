#!/usr/bin/env bash
# Perplexity of a model or casp checkpoint (WikiText-2 and C4 test splits by default, as in
# the paper; needs internet). Offline: DATASETS="wiki lee". Override from the environment:
#   MODEL=checkpoints/llama-2-7b-svd SEQLEN=4096 bash eval/scripts/ppl.sh
set -euo pipefail
source "$(dirname "$0")/../../scripts/casp_cmd.sh"

MODEL=${MODEL:-checkpoints/llava-1.5-7b-svd}
DATASETS=${DATASETS:-wikitext2 c4}
SPLIT=${SPLIT:-test}
SEQLEN=${SEQLEN:-2048}              # 4096 for the Llama-2 numbers in the paper
MAX_WINDOWS=${MAX_WINDOWS:-}        # cap for quick runs; empty = the whole test text
OUTPUT=${OUTPUT:-}                  # JSON results file (optional)
DEVICE=${DEVICE:-auto}

args=(ppl --model "$MODEL" --dataset $DATASETS --split "$SPLIT" --seqlen "$SEQLEN" --device "$DEVICE")
[ -n "$MAX_WINDOWS" ] && args+=(--max-windows "$MAX_WINDOWS")
[ -n "$OUTPUT" ] && args+=(--output "$OUTPUT")
"$CASP" "${args[@]}"
