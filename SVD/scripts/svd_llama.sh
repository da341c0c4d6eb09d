#!/usr/bin/env bash
# Stage 1 for Llama-family LLMs: data-aware low-rank W_q and W_k (paper defaults: Llama-2-7B,
# context 4096, 75% compression, 256 RedPajama samples, seed 3). Override any value from the
# environment, e.g. MODEL=smollm2-135m DATASET=wiki NSAMPLES=32 SEQLEN=512 bash SVD/scripts/svd_llama.sh
set -euo pipefail
MODEL=${MODEL:-meta-llama/Llama-2-7b-hf}
OUTPUT=${OUTPUT:-checkpoints/llama-2-7b-svd}
COMPRESSION=${COMPRESSION:-0.75}
RANK_MULTIPLE=${RANK_MULTIPLE:-8}   # ranks multiple of 8: AQLM's input groups divide them
DATASET=${DATASET:-redpajama}
NSAMPLES=${NSAMPLES:-256}
SEQLEN=${SEQLEN:-4096}
BATCH_SIZE=${BATCH_SIZE:-4}
EXTRA=${EXTRA:-}

source "$(dirname "$0")/lowrank_stage.sh"
