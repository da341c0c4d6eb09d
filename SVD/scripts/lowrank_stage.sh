# Sourced by svd_llava.sh and svd_llama.sh after they set their defaults: runs stage 1.
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/casp_cmd.sh"
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/stage_defaults.sh"
"$CASP" lowrank \
  --model "$MODEL" \
  --output "$OUTPUT" \
  --compression "$COMPRESSION" \
  --rank-multiple "${RANK_MULTIPLE:-8}" \
  --dataset "$DATASET" \
  --nsamples "$NSAMPLES" \
  --seqlen "$SEQLEN" \
  --seed "$SEED" \
  --batch-size "$BATCH_SIZE" \
  --device "$DEVICE" \
  --dtype "$DTYPE" \
  ${mm_calib[@]+"${mm_calib[@]}"} \
  ${EXTRA:-}
