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
# Multimodal calibration for every step of a stage script, where set: MM_DATA (LLaVA-Instruct
# JSON), IMAGE_ROOT (its images' folder), NUM_FRAMES (frames kept per video; casp's default 8)
mm_calib=()
if [ -n "${MM_DATA:-}" ]; then mm_calib+=(--mm-data "$MM_DATA"); fi
if [ -n "${IMAGE_ROOT:-}" ]; then mm_calib+=(--image-root "$IMAGE_ROOT"); fi
if [ -n "${NUM_FRAMES:-}" ]; then mm_calib+=(--num-frames "$NUM_FRAMES"); fi
