# Sourced by the Optspa scripts after they set their defaults: with SEARCH=1 it first runs the
# TPE search over per-block pruning ratios (casp prune-search; a killed search resumes from
# its SQLite study) unless PROFILE already exists, then prunes with that profile; with
# SEARCH=0 every linear gets RATIO (or NM) with METHOD (the baselines).
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/casp_cmd.sh"
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/stage_defaults.sh"
calib=(--dataset "$DATASET" --nsamples "$NSAMPLES" --seqlen "$SEQLEN" --seed "$SEED"
       --batch-size "$BATCH_SIZE" --device "$DEVICE" --dtype "$DTYPE"
       ${mm_calib[@]+"${mm_calib[@]}"})
prune_args=()
if [ "${SEARCH:-0}" = 1 ]; then
  PROFILE=${PROFILE:-$OUTPUT.profile.json}
  fine=()
  [ "${PER_TYPE:-0}" = 1 ] && fine=(--per-type)
  if [ ! -f "$PROFILE" ]; then
    "$CASP" prune-search --model "$MODEL" --output "$PROFILE" --target "$TARGET" \
      --blocks "$BLOCKS" --spread "$SPREAD" --step "$STEP" --score "$METHOD" --mode "$MODE" \
      --tolerance "$TOLERANCE" --trials "$TRIALS" --search-seed "$SEARCH_SEED" \
      --objective "$OBJECTIVE" --val-windows "$VAL_WINDOWS" ${fine[@]+"${fine[@]}"} \
      "${calib[@]}"
  fi
  prune_args=(--profile "$PROFILE")
elif [ -n "${NM:-}" ]; then
  prune_args=(--nm "$NM")
else
  prune_args=(--ratio "$RATIO")
fi
"$CASP" prune --model "$MODEL" --output "$OUTPUT" --method "$METHOD" \
  ${prune_args[@]+"${prune_args[@]}"} "${calib[@]}" ${EXTRA:-}
