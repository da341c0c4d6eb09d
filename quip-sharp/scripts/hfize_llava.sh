#!/usr/bin/env bash
# QuIP# step 1 for LLaVA (the paper's "prepare hessians"): E[x x^T] of every linear input of
# the language model, layer by layer, from the low-rank checkpoint of SVD/scripts/svd_llava.sh
# (as given: nothing quantized), written to a directory that quantize_finetune_llava.sh reads.
# Text calibration as the other stages (the paper calibrates LLaVA with RedPajama text). A
# rerun keeps the layers already written. Override from the environment, e.g.
#   MODEL=checkpoints/llava-next-7b-svd OUTPUT=checkpoints/llava-next-7b-svd-hessians bash quip-sharp/scripts/hfize_llava.sh
set -euo pipefail
MODEL=${MODEL:-checkpoints/llava-1.5-7b-svd}
OUTPUT=${OUTPUT:-checkpoints/llava-1.5-7b-svd-hessians}
DATASET=${DATASET:-redpajama}
NSAMPLES=${NSAMPLES:-128}
SEQLEN=${SEQLEN:-2048}
EXTRA=${EXTRA:-}                    # more casp hessians flags, e.g. "--layers 0-3"
HESSIANS_ONLY=1
source "$(dirname "$0")/quip_stage.sh"
