#!/usr/bin/env bash
# The wanda baseline the seed paper compares with, on LLaVA-1.5 7B: every linear of the
# language model at RATIO unstructured sparsity (or NM, e.g. NM=2:4), layer by layer, 128 C4
# calibration windows at 2048 tokens. Override from the environment, e.g.
#   RATIO=0.6 OUTPUT=checkpoints/llava-1.5-7b-wanda-60 bash Optspa/scripts/prune_wanda_llava.sh
set -euo pipefail
MODEL=${MODEL:-llava-hf/llava-1.5-7b-hf}
OUTPUT=${OUTPUT:-checkpoints/llava-1.5-7b-wanda-50}
METHOD=wanda
RATIO=${RATIO:-0.5}
NM=${NM:-}
DATASET=${DATASET:-c4}
NSAMPLES=${NSAMPLES:-128}
SEQLEN=${SEQLEN:-2048}
SEED=${SEED:-0}
SEARCH=0
source "$(dirname "$0")/prune_stage.sh"
