#!/usr/bin/env bash
# CASP_GPTQ for LLaVA-NeXT (LLaVA-1.6): bit allocation (stage 2) and the quantizer with the
# plan (stage 3) on the low-rank checkpoint of SVD/scripts/svd_llava_next.sh. The same
# settings and paper defaults as quantize_llava.sh (see there); only the model and paths
# differ. Multimodal calibration instead of text: MM_DATA=instruct.json IMAGE_ROOT=images/
# (LLaVA-Instruct JSON; images of any size, tiled at any resolution). Override any value from
# the environment, e.g.
#   OUTPUT=checkpoints/llava-next-7b-casp-gptq-2 bash GPTQ/scripts/quantize_llava_next.sh
set -euo pipefail
MODEL=${MODEL:-checkpoints/llava-next-7b-svd}
OUTPUT=${OUTPUT:-checkpoints/llava-next-7b-casp-gptq}
source "$(dirname "$0")/quantize_llava.sh"
