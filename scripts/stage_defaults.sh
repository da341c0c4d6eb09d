# Sourced by the stage files (SVD/, GPTQ/, AQLM/, quip-sharp/ *_stage.sh, casp_measured.sh)
# after a stage script set its own values: the run settings every calibrated stage shares,
# each overridable from the environment. The seed of the calibration windows is the
# paper's; BATCH_SIZE is calibration windows per forward pass; DEVICE auto = CUDA when
# present; DTYPE auto = float16 on CUDA, float32 on CPU.
SEED=${SEED:-3}
BATCH_SIZE=${BATCH_SIZE:-8}
DEVICE=${DEVICE:-auto}
DTYPE=${DTYPE:-auto}
