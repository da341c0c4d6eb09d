#!/usr/bin/env bash
# The AQLM baseline for Llama-family LLMs (no CASP): see quantize_llava_baseline.sh.
set -euo pipefail
MODEL=${MODEL:-meta-llama/Llama-2-7b-hf}
OUTPUT=${OUTPUT:-checkpoints/llama-2-7b-aqlm-2x8}
SEQLEN=${SEQLEN:-4096}
source "$(dirname "$0")/quantize_llava_baseline.sh"
