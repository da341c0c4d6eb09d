#!/usr/bin/env bash
# The AQLM baseline for LLaVA (no CASP): every linear of the language model with CODEBOOKS
# (2x8, group 8: 2 bits), 128 calibration samples, relative tolerance 0.01. Override from
# the environment, e.g. CODEBOOKS=1x16 OUTPUT=checkpoints/llava-1.5-7b-aqlm-1x16 bash AQLM/scripts/quantize_llava_baseline.sh
set -euo pipefail
MODEL=${MODEL:-llava-hf/llava-1.5-7b-hf}
OUTPUT=${OUTPUT:-checkpoints/llava-1.5-7b-aqlm-2x8}
CODEBOOKS=${CODEBOOKS:-2x8}
IN_GROUP_SIZE=${IN_GROUP_SIZE:-8}
BEAM_SIZE=${BEAM_SIZE:-1}
MAX_ROUNDS=${MAX_ROUNDS:-100}
STEPS_PER_ROUND=${STEPS_PER_ROUND:-100}
LR=${LR:-1e-4}
TOLERANCE=${TOLERANCE:-0.01}
FINETUNE_STEPS=${FINETUNE_STEPS:-0}
DATASET=${DATASET:-redpajama}
NSAMPLES=${NSAMPLES:-128}
SEQLEN=${SEQLEN:-2048}
EXTRA=${EXTRA:-}                  # e.g. "--export-aqlm checkpoints/llava-aqlm-hf" (HF AQLM format)
unset PLAN_BUDGET
source "$(dirname "$0")/aqlm_stage.sh"
