#!/usr/bin/env bash
# Create (idempotently) bench/.refenv: the reference GPTQ environment for bench/reference_gptq.py.
# GPTQModel 7.6.0 (the newest release that accepts torch 2.13; 7.7.0 needs torch>=2.14.1) on the
# CPU build of torch 2.13.0, plus optimum 2.3.0 so that transformers can load GPTQ checkpoints.
# Every package is pinned to the versions this was verified with. Prints one line; exits non-zero
# when the environment cannot be made.
#   REFENV=DIR      where to create it (default: bench/.refenv)
#   TORCH_SPEC=...  how to get torch, as in scripts/install.sh, e.g.
#                   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
REFENV=${REFENV:-bench/.refenv}
LOG=$(mktemp /tmp/reference_env.XXXXXX.log)
trap 'rm -f "$LOG.req" "$LOG.con"' EXIT

fail() {  # one line; the full pip/python output stays in $LOG
  echo "reference_env.sh: FAILED: $1 (details: $LOG)" >&2
  exit 1
}

# The complete pinned set (pip freeze of the verified environment, torch excluded).
cat >"$LOG.req" <<'EOF'
GPTQModel==7.6.0
optimum==2.3.0
transformers==5.23.0
accelerate==1.15.0
safetensors==0.8.0
tokenizers==0.23.3
huggingface_hub==2.4.0
hf-xet==1.8.0
numpy==2.2.6
torchao==0.18.0
datasets==5.2.0
pyarrow==26.0.1
pandas==3.1.1
Defuser==0.0.28
Device-SMI==0.5.7
LogBar==0.4.15
PyPcre==0.6.4
TokeNicer==0.0.14
maturin==1.16.0
ninja==1.13.2
threadpoolctl==3.8.0
protobuf==7.36.2
pillow==13.0.0
dill==0.4.1
multiprocess==0.70.19
xxhash==4.1.0
Jinja2==3.1.6
MarkupSafe==3.0.4
packaging==26.3
filelock==4.2.11
fsspec==2026.9.0
requests==2.34.2
urllib3==2.8.0
idna==3.20
certifi==2026.10.18
charset-normalizer==3.5.2
regex==2026.11.15
PyYAML==6.0.3
tqdm==4.70.1
psutil==7.2.2
pydantic==2.14.3
pydantic_core==2.50.4
typing-inspection==0.4.5
annotated-types==0.8.0
annotated-doc==0.0.7
typing_extensions==4.16.0
rich==15.0.0
Pygments==2.21.0
markdown-it-py==4.3.0
mdurl==0.1.2
typer==0.29.2
click==8.5.1
shellingham==1.5.4
httpx2==2.16.2
httpcore2==2.16.2
h11==0.16.0
anyio==4.16.0
truststore==0.10.5
python-dateutil==4.0.0
tzdata==2026.6
sympy==1.14.0
mpmath==1.3.0
networkx==3.6.1
EOF

check() {
  GPTQMODEL_CPU_WORKERS=2 "$REFENV/bin/python" - <<'EOF' >>"$LOG" 2>&1
import importlib.metadata as md
want = {"gptqmodel": "7.6.0", "optimum": "2.3.0", "transformers": "5.23.0"}
for name, version in want.items():
    assert md.version(name) == version, f"{name} {md.version(name)} != {version}"
import torch
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
import gptqmodel  # noqa: F401  (imports its kernels and patches; fails on a broken install)
from gptqmodel import GPTQModel, QuantizeConfig  # noqa: F401
EOF
}

if [ -x "$REFENV/bin/python" ] && check; then
  rm -f "$LOG"
  echo "reference_env.sh: $REFENV ready (gptqmodel 7.6.0, optimum 2.3.0, transformers 5.23.0, torch $("$REFENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null))"
  exit 0
fi

start=$(date +%s)
if [ ! -x "$REFENV/bin/python" ]; then
  "$PY" -m venv "$REFENV" >>"$LOG" 2>&1 || fail "cannot create the venv $REFENV with $PY"
fi
PIP="$REFENV/bin/python -m pip"

if ! "$REFENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    $PIP install ${TORCH_SPEC:-torch==2.13.0} >>"$LOG" 2>&1 || fail "installing torch 2.13.0"
  else
    # the CPU build: where pip does not resolve torch==2.13.0 to a CPU wheel, set TORCH_SPEC
    # shellcheck disable=SC2086
    $PIP install ${TORCH_SPEC:-torch==2.13.0} >>"$LOG" 2>&1 || fail "installing torch 2.13.0 (CPU)"
  fi
fi

# Keep the installed torch: the constraint stops any dependency from replacing it.
echo "torch==2.13.0" >"$LOG.con"
$PIP install -r "$LOG.req" -c "$LOG.con" >>"$LOG" 2>&1 || fail "installing the pinned GPTQModel set"
check || fail "the installed environment does not import (gptqmodel/optimum/transformers/torch)"
rm -f "$LOG"
echo "reference_env.sh: $REFENV created in $(( $(date +%s) - start )) s (gptqmodel 7.6.0, optimum 2.3.0, transformers 5.23.0, torch $("$REFENV/bin/python" -c 'import torch; print(torch.__version__)'))"
