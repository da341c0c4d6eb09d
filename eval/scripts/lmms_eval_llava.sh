#!/usr/bin/env bash
# The paper's image-language benchmarks (supp. Tab. 4) through lmms-eval on a LLaVA-1.5
# checkpoint (casp's registered lmms-eval model `casp`; any casp checkpoint or HF directory).
# Needs the hub for the data and a GPU for the full sets; the tasks' own imports come with
# `pip install -e ".[lmms-tasks]"` (pycocoevalcap for CIDEr, openai for the GPT-judged
# LiveBench / LLaVA-Bench tasks, which also need OPENAI_API_KEY). Override from the
# environment, e.g.:
#   MODEL=checkpoints/llava-1.5-7b-gptq-2bit TASKS=gqa,mme LIMIT=100 bash eval/scripts/lmms_eval_llava.sh
#
# Tab. 4 -> lmms-eval 0.7.3 task: COCO-2017 coco2017_cap_val, Flickr30k flickr30k_test, NoCaps
# nocaps_val (CIDEr); GQA gqa (exact match); MMBench mmbench_en_dev; MME mme; MMMU mmmu_val;
# ScienceQA-Image scienceqa_img; SeedBench-Image seedbench; LiveBench live_bench,
# LLaVA-Bench-Wilder llava_wilder_small, LLaVA-Bench-COCO llava_bench_coco (the paper reports
# their perplexity; lmms-eval 0.7.3 scores them with a GPT judge).
set -euo pipefail

MODEL=${MODEL:-checkpoints/llava-1.5-7b-casp-gptq}
TASKS=${TASKS:-coco2017_cap_val,flickr30k_test,nocaps_val,gqa,mmbench_en_dev,mme,mmmu_val,scienceqa_img,seedbench,live_bench,llava_wilder_small,llava_bench_coco}
source "$(dirname "$0")/lmms_eval_common.sh"
