#!/usr/bin/env bash
# QuIP# step 1 for Llama-family LLMs: the offline Hessians of the low-rank checkpoint written
# by SVD/scripts/svd_llama.sh. The same settings as hfize_llava.sh (see there); only the
# paths differ. Override from the environment, e.g.
#   MODEL=checkpoints/llama-2-13b-svd OUTPUT=checkpoints/llama-2-13b-svd-hessians bash quip-sharp/scripts/hfize_llama.sh
set -euo pipefail
MODEL=${MODEL:-checkpoints/llama-2-7b-svd}
OUTPUT=${OUTPUT:-checkpoints/llama-2-7b-svd-hessians}
source "$(dirname "$0")/hfize_llava.sh"
