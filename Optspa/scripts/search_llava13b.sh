#!/usr/bin/env bash
# The seed paper's adaptive sparsity for LLaVA-1.5 13B: the settings of search_llava.sh (see
# there; 40 layers in 8 blocks of 5); only the model paths differ. Override from the
# environment as there.
set -euo pipefail
MODEL=${MODEL:-llava-hf/llava-1.5-13b-hf}
OUTPUT=${OUTPUT:-checkpoints/llava-1.5-13b-optspa-50}
source "$(dirname "$0")/search_llava.sh"
