#!/usr/bin/env bash
# End to end on a Llama-family LLM: CASP_AQLM against the AQLM baseline at the same average
# bits (Llama-2-7B by default). Variables: see scripts/casp_e2e.sh.
set -euo pipefail
export QUANTIZER=aqlm FAMILY=llama
export BASE_MODEL=${BASE_MODEL:-meta-llama/Llama-2-7b-hf}
exec bash "$(dirname "$0")/casp_e2e.sh"
