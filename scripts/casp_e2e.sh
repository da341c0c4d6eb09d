#!/usr/bin/env bash
# End to end: CASP_<quantizer> against the <quantizer> baseline at the same average bits.
# Called by scripts/casp_{gptq,aqlm,quip}_{llava,llava_next,llava_next_video,llama}.sh, which
# set QUANTIZER and FAMILY.
#   1. SVD/scripts/svd_$FAMILY.sh                     low-rank W_q/W_k (75%, whitened)
#   (QuIP# only: quip-sharp/scripts/hfize_$FAMILY.sh, the low-rank model's Hessians)
#   2. $Q/scripts/quantize_$FAMILY.sh                 bit plan at the baseline's budget + quantizer
#      (QuIP#: quip-sharp/scripts/quantize_finetune_$FAMILY.sh)
#   3. $Q/scripts/quantize_${FAMILY}_baseline.sh      the uniform baseline (GPTQ 2-bit g128,
#      AQLM 2x8, QuIP# E8P12 from the original model's Hessians)
#   4. eval/scripts/ppl.sh                            perplexity of the original and both models
# Every stage's own variables apply (see those scripts); prefix them here with SVD_, GPTQ_ /
# AQLM_ / QUIP_ (the quantizer's stages) or EVAL_ to set one stage only, e.g. a quick offline run:
#   BASE_MODEL=/path/to/llava WORK=runs/e2e SVD_DATASET=wiki GPTQ_DATASET=wiki \
#   SVD_NSAMPLES=16 GPTQ_NSAMPLES=16 SVD_SEQLEN=512 GPTQ_SEQLEN=512 EVAL_DATASETS="wiki lee" \
#   EVAL_SEQLEN=512 bash scripts/casp_gptq_llava.sh
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
QUANTIZER=${QUANTIZER:-gptq}
case "$QUANTIZER" in
  gptq) QDIR=GPTQ; PREFIX=GPTQ; BASELINE_NAME=gptq-2bit; QSCRIPT=quantize ;;
  aqlm) QDIR=AQLM; PREFIX=AQLM; BASELINE_NAME=aqlm-2x8; QSCRIPT=quantize ;;
  quip) QDIR=quip-sharp; PREFIX=QUIP; BASELINE_NAME=quip-e8p12; QSCRIPT=quantize_finetune ;;
  *) echo "casp: error: QUANTIZER=$QUANTIZER is not gptq, aqlm or quip" >&2; exit 2 ;;
esac
FAMILY=${FAMILY:-llava}
BASE_MODEL=${BASE_MODEL:-llava-hf/llava-1.5-7b-hf}
NAME=${NAME:-$(basename "$BASE_MODEL")}
WORK=${WORK:-checkpoints}
mkdir -p "$WORK"

stage() {   # stage PREFIX SCRIPT VAR=VALUE...: run SCRIPT with PREFIX_* variables unprefixed
  local prefix=$1 script=$2; shift 2
  local overrides=()
  for var in DATASET NSAMPLES SEQLEN SEED BATCH_SIZE DEVICE DTYPE EXTRA BITS GROUP_SIZE \
             ALLOWED_BITS PLAN_BUDGET FACTOR_BITS COMPRESSION RANK_MULTIPLE DATASETS SPLIT \
             MAX_WINDOWS CODEBOOKS CODEBOOK_MAP IN_GROUP_SIZE BEAM_SIZE MAX_ROUNDS \
             STEPS_PER_ROUND TOLERANCE FINETUNE_STEPS CODEBOOK SIGMA_REG MM_DATA IMAGE_ROOT \
             NUM_FRAMES; do
    local name="${prefix}_${var}"
    [ -n "${!name:-}" ] && overrides+=("$var=${!name}")
  done
  # explicit VAR=VALUE arguments win over the prefixed variables
  env ${overrides[@]+"${overrides[@]}"} "$@" bash "$HERE/$script"
}

stage SVD "SVD/scripts/svd_${FAMILY}.sh" MODEL="$BASE_MODEL" OUTPUT="$WORK/$NAME-svd"
hessians=()
if [ "$QUANTIZER" = quip ]; then
  # QUIP_EXTRA holds casp quip flags: not for the Hessian step
  stage QUIP "quip-sharp/scripts/hfize_${FAMILY}.sh" MODEL="$WORK/$NAME-svd" \
    OUTPUT="$WORK/$NAME-svd-hessians" EXTRA=
  hessians=(HESSIANS="$WORK/$NAME-svd-hessians")
fi
stage "$PREFIX" "$QDIR/scripts/${QSCRIPT}_${FAMILY}.sh" MODEL="$WORK/$NAME-svd" \
  OUTPUT="$WORK/$NAME-casp-$QUANTIZER" ${hessians[@]+"${hessians[@]}"}
[ "$QUANTIZER" = quip ] && hessians=(HESSIANS="$WORK/$NAME-hessians")
stage "$PREFIX" "$QDIR/scripts/${QSCRIPT}_${FAMILY}_baseline.sh" MODEL="$BASE_MODEL" \
  OUTPUT="$WORK/$NAME-$BASELINE_NAME" ${hessians[@]+"${hessians[@]}"}
EVAL_DATASETS=${EVAL_DATASETS:-wikitext2 c4}
EVAL_SEQLEN=${EVAL_SEQLEN:-2048}
for model in "$BASE_MODEL" "$WORK/$NAME-$BASELINE_NAME" "$WORK/$NAME-casp-$QUANTIZER"; do
  stage EVAL eval/scripts/ppl.sh MODEL="$model" DATASETS="$EVAL_DATASETS" SEQLEN="$EVAL_SEQLEN" \
    OUTPUT="$WORK/$(basename "$model")-ppl.json"
done
