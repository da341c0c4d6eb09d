#!/usr/bin/env bash
# End to end on LLaVA: CASP_GPTQ against the GPTQ baseline (2-bit g128) at the same average
# bits: low-rank, bit plan + GPTQ, baseline, perplexity. Variables: see scripts/casp_e2e.sh,
# e.g. BASE_MODEL=llava-hf/llava-v1.6-vicuna-7b-hf bash scripts/casp_gptq_llava.sh
set -euo pipefail
export QUANTIZER=gptq FAMILY=llava
exec bash "$(dirname "$0")/casp_e2e.sh"
