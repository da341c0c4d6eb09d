#!/usr/bin/env bash
# End to end on LLaVA: CASP_AQLM against the AQLM baseline (2x8, group 8) at the same average
# bits: low-rank, bit plan + AQLM, baseline, perplexity. Variables: see scripts/casp_e2e.sh
# (AQLM_* sets the AQLM stages only), e.g. AQLM_BEAM_SIZE=8 bash scripts/casp_aqlm_llava.sh
set -euo pipefail
export QUANTIZER=aqlm FAMILY=llava
exec bash "$(dirname "$0")/casp_e2e.sh"
