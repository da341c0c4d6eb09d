#!/usr/bin/env bash
# The QuIP# baseline for LLaVA (no CASP): every linear of the language model with CODEBOOK
# (E8P12: 2 bits) from the offline Hessians of the original model (computed first into
# HESSIANS if missing), sigma_reg 0.01, fine-tuning off. Override from the environment, e.g.
#   CODEBOOK=e8p12rvq3b OUTPUT=checkpoints/llava-1.5-7b-quip-3bit bash quip-sharp/scripts/quantize_finetune_llava_baseline.sh
set -euo pipefail
MODEL=${MODEL:-llava-hf/llava-1.5-7b-hf}
HESSIANS=${HESSIANS:-checkpoints/llava-1.5-7b-hessians}
OUTPUT=${OUTPUT:-checkpoints/llava-1.5-7b-quip-e8p12}
CODEBOOK=${CODEBOOK:-e8p12}
SIGMA_REG=${SIGMA_REG:-0.01}
FINETUNE_STEPS=${FINETUNE_STEPS:-0}
DATASET=${DATASET:-redpajama}
NSAMPLES=${NSAMPLES:-128}
SEQLEN=${SEQLEN:-2048}
EXTRA=${EXTRA:-}
unset PLAN_BUDGET
source "$(dirname "$0")/quip_stage.sh"
