#!/usr/bin/env bash
# Stage 1 for LLaVA-OneVision (Qwen2 language model): the same settings and paper defaults as
# svd_llava.sh (75% compression, ranks multiple of 8, 256 x 2048 RedPajama tokens, seed 3);
# only the model and paths differ. Multimodal calibration instead of text: MM_DATA=instruct.json
# IMAGE_ROOT=images/ (LLaVA-Instruct JSON). Override any value from the environment, e.g.
#   MODEL=llava-hf/llava-onevision-qwen2-0.5b-ov-hf OUTPUT=checkpoints/llava-onevision-0.5b-svd bash SVD/scripts/svd_onevision.sh
set -euo pipefail
MODEL=${MODEL:-llava-hf/llava-onevision-qwen2-7b-ov-hf}
OUTPUT=${OUTPUT:-checkpoints/llava-onevision-qwen2-7b-svd}
source "$(dirname "$0")/svd_llava.sh"
