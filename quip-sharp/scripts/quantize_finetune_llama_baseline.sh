#!/usr/bin/env bash
# The QuIP# baseline for Llama-family LLMs (no CASP): uniform E8P12 from the original
# model's offline Hessians. The same settings as quantize_finetune_llava_baseline.sh.
#   MODEL=meta-llama/Llama-2-13b-hf HESSIANS=checkpoints/llama-2-13b-hessians OUTPUT=checkpoints/llama-2-13b-quip-e8p12 bash quip-sharp/scripts/quantize_finetune_llama_baseline.sh
set -euo pipefail
MODEL=${MODEL:-meta-llama/Llama-2-7b-hf}
HESSIANS=${HESSIANS:-checkpoints/llama-2-7b-hessians}
OUTPUT=${OUTPUT:-checkpoints/llama-2-7b-quip-e8p12}
source "$(dirname "$0")/quantize_finetune_llava_baseline.sh"
