#!/usr/bin/env bash
# CASP_AQLM for LLaVA-NeXT-Video: bit allocation (stage 2) and the quantizer with the plan
# (stage 3) on the low-rank checkpoint of SVD/scripts/svd_llava_next_video.sh. The same
# settings and paper defaults as quantize_llava.sh (see there); only the model and paths
# differ. Multimodal calibration instead of text: MM_DATA=instruct.json IMAGE_ROOT=media/
# (LLaVA-Instruct JSON; a "video" is a list or a directory of frames, of which NUM_FRAMES
# evenly spread are kept). Override any value from the environment, e.g.
#   OUTPUT=checkpoints/llava-next-video-7b-casp-aqlm-2 bash AQLM/scripts/quantize_llava_next_video.sh
set -euo pipefail
MODEL=${MODEL:-checkpoints/llava-next-video-7b-svd}
OUTPUT=${OUTPUT:-checkpoints/llava-next-video-7b-casp-aqlm}
NUM_FRAMES=${NUM_FRAMES:-8}          # frames kept per video with MM_DATA (the paper's 8)
source "$(dirname "$0")/quantize_llava.sh"
