#!/usr/bin/env bash
# Stage 1 for LLaVA: data-aware low-rank W_q and W_k (paper defaults), written as a checkpoint
# that the quantizer scripts read. Every value can be overridden from the environment, e.g.
#   MODEL=llava-hf/llava-v1.6-vicuna-7b-hf OUTPUT=checkpoints/llava-next-7b-svd bash SVD/scripts/svd_llava.sh
# For LLaVA-NeXT / LLaVA-NeXT-Video only MODEL (and OUTPUT) change: casp reads the
# architecture from the model's config.
set -euo pipefail
MODEL=${MODEL:-llava-hf/llava-1.5-7b-hf}
OUTPUT=${OUTPUT:-checkpoints/llava-1.5-7b-svd}
COMPRESSION=${COMPRESSION:-0.75}    # 75% of W_q/W_k parameters removed (rank 512 at 4096)
RANK_MULTIPLE=${RANK_MULTIPLE:-8}   # ranks multiple of 8: AQLM's input groups divide them
DATASET=${DATASET:-redpajama}       # the paper calibrates LLaVA with RedPajama text
NSAMPLES=${NSAMPLES:-256}
SEQLEN=${SEQLEN:-2048}
EXTRA=${EXTRA:-}                    # more flags, e.g. "--mm-data instruct.json --image-root imgs"

source "$(dirname "$0")/lowrank_stage.sh"
