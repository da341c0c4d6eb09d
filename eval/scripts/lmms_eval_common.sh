# Sourced by the lmms_eval_*.sh scripts: runs `casp lmms-eval` with the variables below, each
# overridable from the environment. The task list (TASKS) is set by the calling script.
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/casp_cmd.sh"

OUTPUT=${OUTPUT:-runs/lmms-eval}
LIMIT=${LIMIT:-}                    # documents per task, for quick runs; empty = all
BATCH_SIZE=${BATCH_SIZE:-1}
DEVICE=${DEVICE:-auto}
DTYPE=${DTYPE:-auto}                # auto = float16 on CUDA
MODEL_ARGS=${MODEL_ARGS:-}          # more model_args, e.g. max_new_tokens=64,num_frames=8
ONLINE=${ONLINE:-1}                 # hub tasks need the network; 0 = offline (local tasks)

args=(lmms-eval --model "$MODEL" --tasks "$TASKS" --output "$OUTPUT" --batch-size "$BATCH_SIZE"
      --device "$DEVICE" --dtype "$DTYPE")
if [ -n "$LIMIT" ]; then args+=(--limit "$LIMIT"); fi
if [ -n "$MODEL_ARGS" ]; then args+=(--model-args "$MODEL_ARGS"); fi
if [ "$ONLINE" = 1 ]; then args+=(--online); fi
# easy-vqa only: SAMPLES questions drawn with SEED, their task files in TASK_DIR
if [ -n "${SAMPLES:-}" ]; then args+=(--samples "$SAMPLES"); fi
if [ -n "${SEED:-}" ]; then args+=(--seed "$SEED"); fi
if [ -n "${TASK_DIR:-}" ]; then args+=(--task-dir "$TASK_DIR"); fi
"$CASP" "${args[@]}"
