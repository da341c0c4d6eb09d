#!/usr/bin/env bash
# End to end on a Llama-family LLM: CASP_GPTQ against the GPTQ baseline at the same average
# bits (Llama-2-7B by default; the paper evaluates at context 4096: EVAL_SEQLEN=4096).
# Same stages and variables as scripts/casp_gptq_llava.sh.
set -euo pipefail
export FAMILY=llama
export BASE_MODEL=${BASE_MODEL:-meta-llama/Llama-2-7b-hf}
exec bash "$(dirname "$0")/casp_gptq_llava.sh"
