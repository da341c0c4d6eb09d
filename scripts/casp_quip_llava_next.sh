#!/usr/bin/env bash
# End to end on LLaVA-NeXT (LLaVA-1.6): CASP_QuIP# against the QuIP# baseline (E8P12, 2 bits)
# at the same average bits (llava-hf/llava-v1.6-vicuna-7b-hf by default). Variables: see
# scripts/casp_e2e.sh.
set -euo pipefail
export QUANTIZER=quip FAMILY=llava_next
export BASE_MODEL=${BASE_MODEL:-llava-hf/llava-v1.6-vicuna-7b-hf}
exec bash "$(dirname "$0")/casp_e2e.sh"
