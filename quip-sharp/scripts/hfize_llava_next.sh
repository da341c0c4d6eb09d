#!/usr/bin/env bash
# QuIP# step 1 for LLaVA-NeXT (LLaVA-1.6): the offline Hessians of the low-rank checkpoint
# written by SVD/scripts/svd_llava_next.sh. The same settings as hfize_llava.sh (see there);
# only the paths differ. Multimodal calibration instead of text: MM_DATA=instruct.json
# IMAGE_ROOT=images/ (LLaVA-Instruct JSON; images of any size, tiled at any resolution).
set -euo pipefail
MODEL=${MODEL:-checkpoints/llava-next-7b-svd}
OUTPUT=${OUTPUT:-checkpoints/llava-next-7b-svd-hessians}
source "$(dirname "$0")/hfize_llava.sh"
