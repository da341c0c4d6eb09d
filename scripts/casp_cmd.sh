# Sourced by the stage scripts: finds the casp command (this checkout's .venv first).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${CASP:-}" ]; then
  :
elif [ -x "$ROOT/.venv/bin/casp" ]; then
  CASP="$ROOT/.venv/bin/casp"
elif command -v casp >/dev/null 2>&1; then
  CASP=casp
else
  echo "casp is not installed: run 'bash scripts/install.sh' first" >&2
  exit 1
fi
