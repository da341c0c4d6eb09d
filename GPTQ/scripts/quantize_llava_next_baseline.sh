#!/usr/bin/env bash
# The GPTQ baseline for LLaVA-NeXT (LLaVA-1.6), no CASP: the same settings and paper defaults
# as quantize_llava_baseline.sh (see there); only the model and paths differ. Multimodal
# calibration instead of text: MM_DATA=instruct.json IMAGE_ROOT=images/ (LLaVA-Instruct JSON;
# images of any size, tiled at any resolution).
set -euo pipefail
MODEL=${MODEL:-llava-hf/llava-v1.6-vicuna-7b-hf}
OUTPUT=${OUTPUT:-checkpoints/llava-next-7b-gptq-2bit}
source "$(dirname "$0")/quantize_llava_baseline.sh"
