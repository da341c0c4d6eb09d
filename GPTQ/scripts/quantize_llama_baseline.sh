#!/usr/bin/env bash
# The GPTQ baseline for Llama-family LLMs (no CASP): the same settings and paper defaults as
# quantize_llava_baseline.sh (see there); only the model paths differ. Override from the
# environment, e.g. BITS=3 OUTPUT=checkpoints/llama-2-7b-gptq-3bit bash GPTQ/scripts/quantize_llama_baseline.sh
set -euo pipefail
MODEL=${MODEL:-meta-llama/Llama-2-7b-hf}
OUTPUT=${OUTPUT:-checkpoints/llama-2-7b-gptq-2bit}
source "$(dirname "$0")/quantize_llava_baseline.sh"
