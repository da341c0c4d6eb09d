#!/usr/bin/env bash
# CASP_AQLM for Llama-family LLMs: bit allocation (stage 2) on the low-rank checkpoint written
# by SVD/scripts/svd_llama.sh, then AQLM with the plan (stage 3). The same settings and paper
# defaults as quantize_llava.sh (see there); only the model paths and the context differ.
#   MODEL=checkpoints/llama-2-13b-svd OUTPUT=checkpoints/llama-2-13b-casp-aqlm bash AQLM/scripts/quantize_llama.sh
set -euo pipefail
MODEL=${MODEL:-checkpoints/llama-2-7b-svd}          # low-rank checkpoint (stage 1)
OUTPUT=${OUTPUT:-checkpoints/llama-2-7b-casp-aqlm}
SEQLEN=${SEQLEN:-4096}
source "$(dirname "$0")/quantize_llava.sh"
