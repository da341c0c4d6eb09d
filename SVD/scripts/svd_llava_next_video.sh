#!/usr/bin/env bash
# Stage 1 for LLaVA-NeXT-Video: the same settings and paper defaults as svd_llava.sh (75%
# compression, ranks multiple of 8, 256 x 2048 RedPajama tokens, seed 3); only the model and
# paths differ. Multimodal calibration instead of text: MM_DATA=instruct.json
# IMAGE_ROOT=media/ (LLaVA-Instruct JSON; a "video" is a list or a directory of frames, of
# which NUM_FRAMES evenly spread are kept). Override any value from the environment, e.g.
#   MODEL=path/to/llava-next-video-7b-hf OUTPUT=checkpoints/llava-next-video-7b-svd bash SVD/scripts/svd_llava_next_video.sh
set -euo pipefail
MODEL=${MODEL:-llava-hf/LLaVA-NeXT-Video-7B-hf}
OUTPUT=${OUTPUT:-checkpoints/llava-next-video-7b-svd}
NUM_FRAMES=${NUM_FRAMES:-8}          # frames kept per video with MM_DATA (the paper's 8)
source "$(dirname "$0")/svd_llava.sh"
