#!/usr/bin/env bash
# The paper's image-language benchmarks (supp. Tab. 4) through lmms-eval on a LLaVA-NeXT
# checkpoint; the same tasks and variables as lmms_eval_llava.sh, e.g.:
#   MODEL=checkpoints/llava-next-7b-casp-aqlm LIMIT=100 bash eval/scripts/lmms_eval_llava_next.sh
set -euo pipefail

MODEL=${MODEL:-checkpoints/llava-next-7b-casp-gptq}
TASKS=${TASKS:-coco2017_cap_val,flickr30k_test,nocaps_val,gqa,mmbench_en_dev,mme,mmmu_val,scienceqa_img,seedbench,live_bench,llava_wilder_small,llava_bench_coco}
source "$(dirname "$0")/lmms_eval_common.sh"
