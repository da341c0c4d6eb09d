#!/usr/bin/env bash
# Stage 1 for LLaVA-NeXT (LLaVA-1.6): the same settings and paper defaults as svd_llava.sh
# (75% compression, ranks multiple of 8, 256 x 2048 RedPajama tokens, seed 3); only the model
# and paths differ. Multimodal calibration instead of text: MM_DATA=instruct.json
# IMAGE_ROOT=images/ (LLaVA-Instruct JSON; images of any size, tiled at any resolution).
# Override any value from the environment, e.g.
#   MODEL=path/to/llava-next-7b-hf OUTPUT=checkpoints/llava-next-7b-svd bash SVD/scripts/svd_llava_next.sh
set -euo pipefail
MODEL=${MODEL:-llava-hf/llava-v1.6-vicuna-7b-hf}
OUTPUT=${OUTPUT:-checkpoints/llava-next-7b-svd}
source "$(dirname "$0")/svd_llava.sh"
