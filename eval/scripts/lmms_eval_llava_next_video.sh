#!/usr/bin/env bash
# The paper's video-language benchmarks (supp. Tab. 4) through lmms-eval on a
# LLaVA-NeXT-Video checkpoint, 8 frames per video as in the paper (NUM_FRAMES). Needs the hub,
# a GPU, and `pip install -e ".[lmms-tasks]"` (PyAV decodes the videos; ActivityNet-QA,
# VideoChatGPT and VideoDetailCaption are GPT-judged: OPENAI_API_KEY). Override from the
# environment, e.g.:
#   MODEL=checkpoints/llava-next-video-7b-gptq-2bit TASKS=videomme LIMIT=50 bash eval/scripts/lmms_eval_llava_next_video.sh
#
# Tab. 4 -> lmms-eval 0.7.3 task: ActivityNet activitynetqa, VideoChatGPT-temporal
# videochatgpt_temporal, VideoDetailCaption video_dc499, VideoMME videomme, NextQA
# nextqa_oe_test (WUPS).
set -euo pipefail

MODEL=${MODEL:-checkpoints/llava-next-video-7b-casp-gptq}
TASKS=${TASKS:-activitynetqa,videochatgpt_temporal,video_dc499,videomme,nextqa_oe_test}
NUM_FRAMES=${NUM_FRAMES:-8}
MODEL_ARGS=${MODEL_ARGS:-num_frames=$NUM_FRAMES}
source "$(dirname "$0")/lmms_eval_common.sh"
