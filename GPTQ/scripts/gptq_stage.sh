# Sourced by the GPTQ stage scripts after they set their defaults. With PLAN_BUDGET set it
# first writes a bit plan (stage 2) unless PLAN already exists, then quantizes with it
# (CASP_GPTQ); without, every module gets BITS/GROUP_SIZE (the baseline).
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/casp_cmd.sh"
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/stage_defaults.sh"
calib=(--dataset "$DATASET" --nsamples "$NSAMPLES" --seqlen "$SEQLEN" --seed "$SEED"
       --batch-size "$BATCH_SIZE" --device "$DEVICE" --dtype "$DTYPE"
       ${mm_calib[@]+"${mm_calib[@]}"})
order=(--act-order)
[ "${ACT_ORDER:-1}" = 0 ] && order=(--no-act-order)
[ "${STATIC_GROUPS:-0}" = 1 ] && order+=(--static-groups)
plan_args=()
if [ -n "${PLAN_BUDGET:-}" ]; then
  PLAN=${PLAN:-$OUTPUT.plan.json}
  if [ ! -f "$PLAN" ]; then
    "$CASP" allocate --model "$MODEL" --output "$PLAN" --budget "$PLAN_BUDGET" \
      --bits "$ALLOWED_BITS" --group-size "$GROUP_SIZE" --factor-bits "$FACTOR_BITS" \
      --factor-group-size "$FACTOR_GROUP_SIZE" --importance "$IMPORTANCE" ${order[@]+"${order[@]}"} \
      "${calib[@]}"
  fi
  plan_args=(--plan "$PLAN")
fi
"$CASP" gptq --model "$MODEL" --output "$OUTPUT" ${plan_args[@]+"${plan_args[@]}"} \
  --bits "$BITS" --group-size "$GROUP_SIZE" --damp "$DAMP" ${order[@]+"${order[@]}"} "${calib[@]}" \
  ${EXTRA:-}
