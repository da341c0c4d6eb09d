#!/usr/bin/env bash
# The seed paper's adaptive sparsity for LLaVA-1.5 7B: a TPE search (optuna) over one pruning
# ratio per block of 4 decoder layers at 50% mean sparsity, each trial pruned with the
# authors' relative-importance score (no weight update) and scored by perplexity on 64
# validation windows, then the model pruned with the best profile. The authors' settings: 8
# blocks, ratios target +- 0.05 in steps of 0.025, 50 trials, 128 C4 calibration windows at
# 2048 tokens, calibration seed 0. Override any value from the environment, e.g.
#   TARGET=0.6 TRIALS=100 OUTPUT=checkpoints/llava-1.5-7b-optspa-60 bash Optspa/scripts/search_llava.sh
set -euo pipefail
MODEL=${MODEL:-llava-hf/llava-1.5-7b-hf}
OUTPUT=${OUTPUT:-checkpoints/llava-1.5-7b-optspa-50}
PROFILE=${PROFILE:-$OUTPUT.profile.json}         # reused when it exists
TARGET=${TARGET:-0.5}                            # mean sparsity, parameter-weighted
BLOCKS=${BLOCKS:-8}
SPREAD=${SPREAD:-0.05}
STEP=${STEP:-0.025}
PER_TYPE=${PER_TYPE:-0}                          # 1: a ratio per linear type per block
METHOD=${METHOD:-ria}                            # the score of every trial and of the final pass
MODE=${MODE:-exact}                              # fast: statistics once, trials threshold them
TOLERANCE=${TOLERANCE:-0.005}                    # the authors' code: target - 0.005 is feasible
TRIALS=${TRIALS:-50}
SEARCH_SEED=${SEARCH_SEED:-0}
OBJECTIVE=${OBJECTIVE:-text}                     # vqa: easy-vqa answer perplexity instead
VAL_WINDOWS=${VAL_WINDOWS:-64}
DATASET=${DATASET:-c4}
NSAMPLES=${NSAMPLES:-128}
SEQLEN=${SEQLEN:-2048}
SEED=${SEED:-0}                                  # the authors' calibration seed
SEARCH=1
source "$(dirname "$0")/prune_stage.sh"
