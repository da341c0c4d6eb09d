#!/usr/bin/env bash
# CASP_GPTQ for Llama-family LLMs: bit allocation (stage 2) on the low-rank checkpoint written
# by SVD/scripts/svd_llama.sh, then GPTQ with the plan (stage 3). The same settings and
# paper defaults as quantize_llava.sh (see there); only the model paths differ. Override any
# value from the environment, e.g.
#   MODEL=checkpoints/llama-2-13b-svd OUTPUT=checkpoints/llama-2-13b-casp-gptq bash GPTQ/scripts/quantize_llama.sh
set -euo pipefail
MODEL=${MODEL:-checkpoints/llama-2-7b-svd}          # low-rank checkpoint (stage 1)
OUTPUT=${OUTPUT:-checkpoints/llama-2-7b-casp-gptq}
source "$(dirname "$0")/quantize_llava.sh"
