#!/usr/bin/env bash
# Install casp into ./.venv (idempotent): the CPU torch build unless a GPU is present, the
# package with its test extra, and the offline demo assets (SmolLM2-135M, Lee corpus).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${CASP_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    $PIP install --quiet "${TORCH_SPEC:-torch}"
  else
    # The CPU build: never pull the multi-GB CUDA wheels on a CPU machine.
    $PIP install --quiet "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi
$PIP install --quiet -e ".[test]" 2>&1 | grep -v "is ignored: it is neither" || true
"$VENV/bin/python" -c "import casp, torch; print(f'casp {casp.__version__} installed (torch {torch.__version__})')"
"$VENV/bin/casp" -q fetch >/dev/null
