#!/usr/bin/env bash
# CASP_GPTQ for LLaVA: bit allocation (stage 2) on the low-rank checkpoint written by
# SVD/scripts/svd_llava.sh, then GPTQ with the plan (stage 3). Paper defaults: 2-bit group
# 128 budget, act-order, true-sequential, 128 calibration samples. Override any value from
# the environment, e.g.
#   MODEL=checkpoints/llava-next-7b-svd OUTPUT=checkpoints/llava-next-7b-casp-gptq bash GPTQ/scripts/quantize_llava.sh
set -euo pipefail
MODEL=${MODEL:-checkpoints/llava-1.5-7b-svd}        # low-rank checkpoint (stage 1)
OUTPUT=${OUTPUT:-checkpoints/llava-1.5-7b-casp-gptq}
PLAN=${PLAN:-$OUTPUT.plan.json}                     # reused when it exists
ALLOWED_BITS=${ALLOWED_BITS:-2,3}                   # the widths the paper's code used
FACTOR_BITS=${FACTOR_BITS:-3}                       # low-rank factors: 3 bits ...
FACTOR_GROUP_SIZE=${FACTOR_GROUP_SIZE:--1}          # ... per channel (the paper's code)
IMPORTANCE=${IMPORTANCE:-block_influence}
BITS=${BITS:-2}                                     # modules the plan does not name
GROUP_SIZE=${GROUP_SIZE:-128}
PLAN_BUDGET=${PLAN_BUDGET:-$BITS@$GROUP_SIZE}       # what uniform BITS-bit GPTQ stores (2.25+)
DAMP=${DAMP:-0.01}
DATASET=${DATASET:-c4}                              # GPTQ's calibration text
NSAMPLES=${NSAMPLES:-128}
SEQLEN=${SEQLEN:-2048}
EXTRA=${EXTRA:-}                                    # more casp gptq flags
source "$(dirname "$0")/gptq_stage.sh"
