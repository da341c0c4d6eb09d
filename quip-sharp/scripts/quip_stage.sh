# Sourced by the QuIP# stage scripts after they set their defaults.
#   hessians mode (HESSIANS_ONLY=1): write the offline Hessians of MODEL to OUTPUT.
#   quantize mode: with HESSIANS set, use that directory (computing it first from MODEL if it
#   does not exist yet); with PLAN_BUDGET set, first write a bit plan for QuIP# (stage 2)
#   unless PLAN already exists, then quantize with it (CASP_QuIP#); without, every module gets
#   CODEBOOK (the baseline). Rerunning after an interruption resumes (finished layers of
#   either step are kept).
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/casp_cmd.sh"
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/stage_defaults.sh"
calib=(--dataset "$DATASET" --nsamples "$NSAMPLES" --seqlen "$SEQLEN" --seed "$SEED"
       --batch-size "$BATCH_SIZE" --device "$DEVICE" --dtype "$DTYPE"
       ${mm_calib[@]+"${mm_calib[@]}"})
if [ "${HESSIANS_ONLY:-0}" = 1 ]; then
  "$CASP" hessians --model "$MODEL" --output "$OUTPUT" "${calib[@]}" ${EXTRA:-}
  return 0 2>/dev/null || exit 0
fi
hessian_args=()
if [ -n "${HESSIANS:-}" ]; then
  # computes what is missing (finished layers are kept; a directory of another model is
  # refused), so an interrupted Hessian run is completed here
  "$CASP" hessians --model "$MODEL" --output "$HESSIANS" "${calib[@]}"
  hessian_args=(--hessians "$HESSIANS")
fi
plan_args=()
if [ -n "${PLAN_BUDGET:-}" ]; then
  PLAN=${PLAN:-$OUTPUT.plan.json}
  if [ ! -f "$PLAN" ]; then
    "$CASP" allocate --quantizer quip --model "$MODEL" --output "$PLAN" \
      --budget "$PLAN_BUDGET" --bits "$ALLOWED_BITS" --codebooks "$CODEBOOK_MAP" \
      --factor-bits "$FACTOR_BITS" --importance "$IMPORTANCE" "${calib[@]}"
  fi
  plan_args=(--plan "$PLAN")
fi
"$CASP" quip --model "$MODEL" --output "$OUTPUT" ${plan_args[@]+"${plan_args[@]}"} \
  ${hessian_args[@]+"${hessian_args[@]}"} \
  --codebook "$CODEBOOK" --sigma-reg "$SIGMA_REG" --finetune-steps "$FINETUNE_STEPS" \
  "${calib[@]}" ${EXTRA:-}
