#!/usr/bin/env bash
# CASP_QuIP# for Llama-family LLMs: bit allocation for QuIP# and QuIP# with the plan, on the
# low-rank checkpoint of SVD/scripts/svd_llama.sh and the Hessians of hfize_llama.sh. The same
# settings and paper defaults as quantize_finetune_llava.sh (see there); only the paths differ.
#   MODEL=checkpoints/llama-2-13b-svd HESSIANS=checkpoints/llama-2-13b-svd-hessians OUTPUT=checkpoints/llama-2-13b-casp-quip bash quip-sharp/scripts/quantize_finetune_llama.sh
set -euo pipefail
MODEL=${MODEL:-checkpoints/llama-2-7b-svd}
HESSIANS=${HESSIANS:-checkpoints/llama-2-7b-svd-hessians}
OUTPUT=${OUTPUT:-checkpoints/llama-2-7b-casp-quip}
source "$(dirname "$0")/quantize_finetune_llava.sh"
