#!/usr/bin/env bash
# End to end on Llama-family LLMs: CASP_QuIP# against the QuIP# baseline (E8P12, 2 bits) at the
# same average bits: low-rank, Hessians (hfize), bit plan + QuIP#, baseline, perplexity.
# Variables: see scripts/casp_e2e.sh (QUIP_* sets the QuIP# stages only), e.g.
#   QUIP_SIGMA_REG=0.02 bash scripts/casp_quip_llama.sh
set -euo pipefail
export QUANTIZER=quip FAMILY=llama
export BASE_MODEL=${BASE_MODEL:-meta-llama/Llama-2-7b-hf}
exec bash "$(dirname "$0")/casp_e2e.sh"
