#!/usr/bin/env bash
# End to end on LLaVA: CASP_QuIP# against the QuIP# baseline (E8P12, 2 bits) at the
# same average bits: low-rank, Hessians (hfize), bit plan + QuIP#, baseline, perplexity.
# Variables: see scripts/casp_e2e.sh (QUIP_* sets the QuIP# stages only), e.g.
#   QUIP_SIGMA_REG=0.02 bash scripts/casp_quip_llava.sh
set -euo pipefail
export QUANTIZER=quip FAMILY=llava
exec bash "$(dirname "$0")/casp_e2e.sh"
