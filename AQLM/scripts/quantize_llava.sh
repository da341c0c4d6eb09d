#!/usr/bin/env bash
# CASP_AQLM for LLaVA: bit allocation for AQLM (stage 2) on the low-rank checkpoint written by
# SVD/scripts/svd_llava.sh, then AQLM with the plan (stage 3). Paper defaults: 2x8 codebooks
# (group 8) for 2-bit layers, 2x12 for 3-bit layers and the low-rank factors, widths {2, 3},
# the budget of uniform 2x8, 128 calibration samples, relative tolerance 0.01, no
# fine-tuning. Override any value from the environment, e.g.
#   MODEL=checkpoints/llava-next-7b-svd OUTPUT=checkpoints/llava-next-7b-casp-aqlm bash AQLM/scripts/quantize_llava.sh
set -euo pipefail
MODEL=${MODEL:-checkpoints/llava-1.5-7b-svd}        # low-rank checkpoint (stage 1)
OUTPUT=${OUTPUT:-checkpoints/llava-1.5-7b-casp-aqlm}
PLAN=${PLAN:-$OUTPUT.plan.json}                     # reused when it exists
CODEBOOKS=${CODEBOOKS:-2x8}                         # modules the plan does not name; baseline
IN_GROUP_SIZE=${IN_GROUP_SIZE:-8}
CODEBOOK_MAP=${CODEBOOK_MAP:-2=2x8,3=2x12}          # what a 2- and a 3-bit layer store
ALLOWED_BITS=${ALLOWED_BITS:-2,3}                   # the widths the paper's code used
FACTOR_BITS=${FACTOR_BITS:-3}                       # low-rank factors: 2x12 (the paper's code)
IMPORTANCE=${IMPORTANCE:-block_influence}
PLAN_BUDGET=${PLAN_BUDGET:-${CODEBOOKS}g$IN_GROUP_SIZE}  # what uniform AQLM CODEBOOKS stores
BEAM_SIZE=${BEAM_SIZE:-1}
MAX_ROUNDS=${MAX_ROUNDS:-100}
STEPS_PER_ROUND=${STEPS_PER_ROUND:-100}             # Adam steps on codebooks per round
LR=${LR:-1e-4}
TOLERANCE=${TOLERANCE:-0.01}                        # relative improvement that ends a layer
FINETUNE_STEPS=${FINETUNE_STEPS:-0}                 # block fine-tuning: off, as in the paper
DATASET=${DATASET:-redpajama}
NSAMPLES=${NSAMPLES:-128}
SEQLEN=${SEQLEN:-2048}
EXTRA=${EXTRA:-}                                    # more casp aqlm flags
source "$(dirname "$0")/aqlm_stage.sh"
