#!/usr/bin/env bash
# End to end on LLaVA: CASP_GPTQ against the GPTQ baseline at the same average bits.
#   1. SVD/scripts/svd_llava.sh                  low-rank W_q/W_k (75%, whitened)
#   2. GPTQ/scripts/quantize_llava.sh            bit plan at the 2-bit g128 budget + GPTQ
#   3. GPTQ/scripts/quantize_llava_baseline.sh   uniform 2-bit g128 GPTQ
#   4. eval/scripts/ppl.sh                       perplexity of the original and both models
# Every stage's own variables apply (see those scripts); prefix them here with SVD_, GPTQ_
# or EVAL_ to set one stage only, e.g. a quick offline run:
#   BASE_MODEL=/path/to/llava WORK=runs/e2e SVD_DATASET=wiki GPTQ_DATASET=wiki \
#   SVD_NSAMPLES=16 GPTQ_NSAMPLES=16 SVD_SEQLEN=512 GPTQ_SEQLEN=512 EVAL_DATASETS="wiki lee" \
#   EVAL_SEQLEN=512 bash scripts/casp_gptq_llava.sh
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
FAMILY=${FAMILY:-llava}
BASE_MODEL=${BASE_MODEL:-llava-hf/llava-1.5-7b-hf}
NAME=${NAME:-$(basename "$BASE_MODEL")}
WORK=${WORK:-checkpoints}
mkdir -p "$WORK"

stage() {   # stage PREFIX SCRIPT VAR=VALUE...: run SCRIPT with PREFIX_* variables unprefixed
  local prefix=$1 script=$2; shift 2
  local overrides=()
  for var in DATASET NSAMPLES SEQLEN SEED BATCH_SIZE DEVICE DTYPE EXTRA BITS GROUP_SIZE \
             ALLOWED_BITS PLAN_BUDGET FACTOR_BITS COMPRESSION DATASETS SPLIT MAX_WINDOWS; do
    local name="${prefix}_${var}"
    [ -n "${!name:-}" ] && overrides+=("$var=${!name}")
  done
  env "$@" "${overrides[@]}" bash "$HERE/$script"
}

stage SVD "SVD/scripts/svd_${FAMILY}.sh" MODEL="$BASE_MODEL" OUTPUT="$WORK/$NAME-svd"
stage GPTQ "GPTQ/scripts/quantize_${FAMILY}.sh" MODEL="$WORK/$NAME-svd" \
  OUTPUT="$WORK/$NAME-casp-gptq"
stage GPTQ "GPTQ/scripts/quantize_${FAMILY}_baseline.sh" MODEL="$BASE_MODEL" \
  OUTPUT="$WORK/$NAME-gptq-2bit"
EVAL_DATASETS=${EVAL_DATASETS:-wikitext2 c4}
EVAL_SEQLEN=${EVAL_SEQLEN:-2048}
for model in "$BASE_MODEL" "$WORK/$NAME-gptq-2bit" "$WORK/$NAME-casp-gptq"; do
  stage EVAL eval/scripts/ppl.sh MODEL="$model" DATASETS="$EVAL_DATASETS" SEQLEN="$EVAL_SEQLEN" \
    OUTPUT="$WORK/$(basename "$model")-ppl.json"
done
