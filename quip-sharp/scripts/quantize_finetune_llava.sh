#!/usr/bin/env bash
# CASP_QuIP# for LLaVA, step 2: bit allocation for QuIP# (stage 2) on the low-rank checkpoint
# of SVD/scripts/svd_llava.sh, then QuIP# with the plan (stage 3) from the Hessians of
# hfize_llava.sh (computed here first if missing). Paper defaults: E8P12 (2 bits) for 2-bit
# layers, E8P12RVQ3B (3 bits) for 3-bit layers and the low-rank factors, widths {2, 3}, the
# budget of uniform E8P12, random-sign Hadamard incoherence, BlockLDLQ, sigma_reg 0.01,
# fine-tuning off. Override any value from the environment, e.g.
#   MODEL=checkpoints/llava-next-7b-svd HESSIANS=checkpoints/llava-next-7b-svd-hessians OUTPUT=checkpoints/llava-next-7b-casp-quip bash quip-sharp/scripts/quantize_finetune_llava.sh
set -euo pipefail
MODEL=${MODEL:-checkpoints/llava-1.5-7b-svd}        # low-rank checkpoint (stage 1)
HESSIANS=${HESSIANS:-checkpoints/llava-1.5-7b-svd-hessians}   # hfize_llava.sh's output
OUTPUT=${OUTPUT:-checkpoints/llava-1.5-7b-casp-quip}
PLAN=${PLAN:-$OUTPUT.plan.json}                     # reused when it exists
CODEBOOK=${CODEBOOK:-e8p12}                         # modules the plan does not name; baseline
CODEBOOK_MAP=${CODEBOOK_MAP:-2=e8p12,3=e8p12rvq3b,4=e8p12rvq4b}
ALLOWED_BITS=${ALLOWED_BITS:-2,3}                   # the widths the paper's code used
FACTOR_BITS=${FACTOR_BITS:-3}                       # low-rank factors: E8P12RVQ3B
IMPORTANCE=${IMPORTANCE:-block_influence}
PLAN_BUDGET=${PLAN_BUDGET:-$CODEBOOK}               # what uniform CODEBOOK stores
SIGMA_REG=${SIGMA_REG:-0.01}
FINETUNE_STEPS=${FINETUNE_STEPS:-0}                 # block fine-tuning: off, as in the paper
DATASET=${DATASET:-redpajama}
NSAMPLES=${NSAMPLES:-128}
SEQLEN=${SEQLEN:-2048}
EXTRA=${EXTRA:-}                                    # more casp quip flags
source "$(dirname "$0")/quip_stage.sh"
