#!/usr/bin/env bash
# QuIP# step 1 for LLaVA-NeXT-Video: the offline Hessians of the low-rank checkpoint written
# by SVD/scripts/svd_llava_next_video.sh. The same settings as hfize_llava.sh (see there);
# only the paths differ. Multimodal calibration instead of text: MM_DATA=instruct.json
# IMAGE_ROOT=media/ (LLaVA-Instruct JSON; a "video" is a list or a directory of frames, of
# which NUM_FRAMES evenly spread are kept).
set -euo pipefail
MODEL=${MODEL:-checkpoints/llava-next-video-7b-svd}
OUTPUT=${OUTPUT:-checkpoints/llava-next-video-7b-svd-hessians}
NUM_FRAMES=${NUM_FRAMES:-8}          # frames kept per video with MM_DATA (the paper's 8)
source "$(dirname "$0")/hfize_llava.sh"
