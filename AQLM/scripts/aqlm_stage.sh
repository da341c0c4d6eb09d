# Sourced by the AQLM stage scripts after they set their defaults. With PLAN_BUDGET set it
# first writes a bit plan for AQLM (stage 2) unless PLAN already exists, then quantizes with
# it (CASP_AQLM); without, every module gets CODEBOOKS (the baseline). Rerunning after an
# interruption resumes from the last finished layer.
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/casp_cmd.sh"
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/stage_defaults.sh"
calib=(--dataset "$DATASET" --nsamples "$NSAMPLES" --seqlen "$SEQLEN" --seed "$SEED"
       --batch-size "$BATCH_SIZE" --device "$DEVICE" --dtype "$DTYPE"
       ${mm_calib[@]+"${mm_calib[@]}"})
plan_args=()
if [ -n "${PLAN_BUDGET:-}" ]; then
  PLAN=${PLAN:-$OUTPUT.plan.json}
  if [ ! -f "$PLAN" ]; then
    "$CASP" allocate --quantizer aqlm --model "$MODEL" --output "$PLAN" \
      --budget "$PLAN_BUDGET" --bits "$ALLOWED_BITS" --codebooks "$CODEBOOK_MAP" \
      --factor-bits "$FACTOR_BITS" --importance "$IMPORTANCE" "${calib[@]}"
  fi
  plan_args=(--plan "$PLAN")
fi
"$CASP" aqlm --model "$MODEL" --output "$OUTPUT" ${plan_args[@]+"${plan_args[@]}"} \
  --codebooks "$CODEBOOKS" --in-group-size "$IN_GROUP_SIZE" --beam-size "$BEAM_SIZE" \
  --max-rounds "$MAX_ROUNDS" --steps-per-round "$STEPS_PER_ROUND" --lr "$LR" \
  --tolerance "$TOLERANCE" --finetune-steps "$FINETUNE_STEPS" "${calib[@]}" \
  ${EXTRA:-}
