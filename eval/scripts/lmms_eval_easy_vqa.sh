#!/usr/bin/env bash
# Offline lmms-eval run: easy-vqa answer accuracy (exact match after casp's answer
# normalisation) and answer perplexity, data written from the easy-vqa wheel; no hub, runs on
# CPU. SAMPLES/SEED pick the same questions as `casp vqa --samples N --seed S`. E.g.:
#   MODEL=runs/mini-casp-gptq SAMPLES=200 bash eval/scripts/lmms_eval_easy_vqa.sh
set -euo pipefail

MODEL=${MODEL:-mini-llava}
TASKS=${TASKS:-easy_vqa,easy_vqa_ppl}
SAMPLES=${SAMPLES:-500}
SEED=${SEED:-0}
ONLINE=${ONLINE:-0}
source "$(dirname "$0")/lmms_eval_common.sh"
