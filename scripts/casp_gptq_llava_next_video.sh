#!/usr/bin/env bash
# End to end on LLaVA-NeXT-Video: CASP_GPTQ against the GPTQ baseline (2-bit g128) at the same
# average bits (llava-hf/LLaVA-NeXT-Video-7B-hf by default). Variables: see
# scripts/casp_e2e.sh.
set -euo pipefail
export QUANTIZER=gptq FAMILY=llava_next_video
export BASE_MODEL=${BASE_MODEL:-llava-hf/LLaVA-NeXT-Video-7B-hf}
exec bash "$(dirname "$0")/casp_e2e.sh"
