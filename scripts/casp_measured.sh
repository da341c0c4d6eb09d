#!/usr/bin/env bash
# CASP with the measured search (beyond the paper): instead of low-rank W_q/W_k in every
# layer and a block-influence bit plan, every layer's options (W_q/W_k dense or low-rank at
# LOWRANK_OPTIONS, each width of ALLOWED_BITS) are built with the quantizer and scored by the
# KL divergence they cause in the model's output (SEARCH_SCORE: calibrated Fisher estimates by
# default); the knapsack picks one per part at BUDGET. The settings that won on SmolLM2
# (bench/sweep.py): LOWRANK_OPTIONS=0.5,0.75 with the factors at each width (FACTOR_BITS=0).
# FINETUNE_EPOCHS=2 adds casp finetune (end-to-end, off by default as in the paper).
#   1. casp allocate --measured --lowrank-options   the plan, from the ORIGINAL model
#   2. casp lowrank --plan                          the W_q/W_k the plan chose, at its ranks
#   3. casp gptq | aqlm | quip --plan               the quantizer with the plan
# Override any value from the environment, e.g.
#   QUANTIZER=quip MODEL=llava-hf/llava-1.5-7b-hf OUTPUT=checkpoints/llava-1.5-7b-casp-quip-m \
#     bash scripts/casp_measured.sh
set -euo pipefail
QUANTIZER=${QUANTIZER:-gptq}
MODEL=${MODEL:-llava-hf/llava-1.5-7b-hf}             # the original model
OUTPUT=${OUTPUT:-checkpoints/$(basename "$MODEL")-casp-$QUANTIZER-measured}
PLAN=${PLAN:-$OUTPUT.plan.json}                     # reused when it exists
LOWRANK=${LOWRANK:-$OUTPUT-svd}                     # the low-rank checkpoint of step 2
case "$QUANTIZER" in
  gptq) BUDGET=${BUDGET:-2@128}; CODEBOOKS=${CODEBOOKS:-} ;;
  aqlm) BUDGET=${BUDGET:-2x8}; CODEBOOKS=${CODEBOOKS:-2=2x8,3=2x12} ;;
  quip) BUDGET=${BUDGET:-e8p12}; CODEBOOKS=${CODEBOOKS:-2=e8p12,3=e8p12rvq3b,4=e8p12rvq4b} ;;
  *) echo "casp: error: QUANTIZER=$QUANTIZER is not gptq, aqlm or quip" >&2; exit 2 ;;
esac
ALLOWED_BITS=${ALLOWED_BITS:-2,3}                   # the widths the paper's code used
FACTOR_BITS=${FACTOR_BITS:-0}                       # low-rank factors (0: each width)
GROUP_SIZE=${GROUP_SIZE:-128}                       # GPTQ only
LOWRANK_OPTIONS=${LOWRANK_OPTIONS:-0.5,0.75}        # compressions a layer may take (paper: 0.75)
SEARCH_SCORE=${SEARCH_SCORE:-calibrated}            # calibrated | fisher | kl (exact, slower)
FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-0}               # end-to-end fine-tuning after (0: off)
RANK_MULTIPLE=${RANK_MULTIPLE:-8}
SEARCH_SAMPLES=${SEARCH_SAMPLES:-8}                 # samples whose output KL is measured
DATASET=${DATASET:-c4}
NSAMPLES=${NSAMPLES:-128}
SEQLEN=${SEQLEN:-2048}
EXTRA=${EXTRA:-}                                    # more flags for the quantizer (step 3)
source "$(dirname "$0")/casp_cmd.sh"
source "$(dirname "$0")/stage_defaults.sh"
calib=(--dataset "$DATASET" --nsamples "$NSAMPLES" --seqlen "$SEQLEN" --seed "$SEED"
       --batch-size "$BATCH_SIZE" --device "$DEVICE" --dtype "$DTYPE"
       ${mm_calib[@]+"${mm_calib[@]}"})
books=()
[ -n "$CODEBOOKS" ] && books=(--codebooks "$CODEBOOKS")
if [ ! -f "$PLAN" ]; then
  "$CASP" allocate --quantizer "$QUANTIZER" --model "$MODEL" --output "$PLAN" \
    --budget "$BUDGET" --bits "$ALLOWED_BITS" --group-size "$GROUP_SIZE" \
    --factor-bits "$FACTOR_BITS" ${books[@]+"${books[@]}"} --measured \
    --lowrank-options "$LOWRANK_OPTIONS" --rank-multiple "$RANK_MULTIPLE" \
    --search-samples "$SEARCH_SAMPLES" --search-score "$SEARCH_SCORE" "${calib[@]}"
fi
source_model=$MODEL
if ! grep -q '"ranks": {}' "$PLAN"; then          # the plan cut some W_q/W_k
  "$CASP" lowrank --model "$MODEL" --plan "$PLAN" --output "$LOWRANK" "${calib[@]}"
  source_model=$LOWRANK
fi
"$CASP" "$QUANTIZER" --model "$source_model" --plan "$PLAN" --output "$OUTPUT" "${calib[@]}" \
  ${EXTRA:-}
if [ "$FINETUNE_EPOCHS" != 0 ]; then
  "$CASP" finetune --model "$OUTPUT" --teacher "$MODEL" --output "$OUTPUT-ft" \
    --epochs "$FINETUNE_EPOCHS" "${calib[@]}"
fi
