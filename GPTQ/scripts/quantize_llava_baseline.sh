#!/usr/bin/env bash
# The GPTQ baseline for LLaVA (no CASP): every linear of the language model at BITS bits,
# group GROUP_SIZE, act-order, true-sequential, 128 calibration samples. Override from the
# environment, e.g. BITS=3 OUTPUT=checkpoints/llava-1.5-7b-gptq-3bit bash GPTQ/scripts/quantize_llava_baseline.sh
set -euo pipefail
MODEL=${MODEL:-llava-hf/llava-1.5-7b-hf}
OUTPUT=${OUTPUT:-checkpoints/llava-1.5-7b-gptq-2bit}
BITS=${BITS:-2}
GROUP_SIZE=${GROUP_SIZE:-128}
DAMP=${DAMP:-0.01}
DATASET=${DATASET:-c4}
NSAMPLES=${NSAMPLES:-128}
SEQLEN=${SEQLEN:-2048}
EXTRA=${EXTRA:-}                  # e.g. "--export-gptq checkpoints/llava-gptq-std" (2/4/8 bits)
unset PLAN_BUDGET
source "$(dirname "$0")/gptq_stage.sh"
