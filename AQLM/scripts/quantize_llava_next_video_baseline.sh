#!/usr/bin/env bash
# The AQLM baseline for LLaVA-NeXT-Video (no CASP): the same settings and paper defaults as
# quantize_llava_baseline.sh (see there); only the model and paths differ. Multimodal
# calibration instead of text: MM_DATA=instruct.json IMAGE_ROOT=media/ (LLaVA-Instruct JSON; a
# "video" is a list or a directory of frames, of which NUM_FRAMES evenly spread are kept).
set -euo pipefail
MODEL=${MODEL:-llava-hf/LLaVA-NeXT-Video-7B-hf}
OUTPUT=${OUTPUT:-checkpoints/llava-next-video-7b-aqlm-2x8}
NUM_FRAMES=${NUM_FRAMES:-8}          # frames kept per video with MM_DATA (the paper's 8)
source "$(dirname "$0")/quantize_llava_baseline.sh"
