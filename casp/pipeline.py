"""Running a layer-wise stage end to end: calibrate, walk the layers, save a checkpoint.

Every stage (low-rank, importance, the measured search, GPTQ, AQLM, QuIP#, Hessians) goes
through :func:`run_stage`, so output checks, resume and checkpoint writing exist once.
"""
from __future__ import annotations

import logging
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from casp.checkpoint import build_section, check_output_dir, save_checkpoint
from casp.data.calibration import CalibrationConfig, calibration_batches, token_count
from casp.hf_model import LoadedModel, read_casp_section
from casp.identity import fingerprint, stage_key
from casp.layerwise import LayerPass, capture_layer_inputs, run_layerwise

log = logging.getLogger("casp")


@dataclass
class StageResult:
    output: Path | None
    changes: dict = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_gb: float = 0.0
    peak_cuda_gb: float = 0.0
    skipped: bool = False
    calibration_tokens: int = 0


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def progress_dir(output: str | Path) -> Path:
    out = Path(output)
    return out.parent / f".{out.name}.casp-progress"


def output_already_done(model: str, output: str | Path, stage: str, passes: list[LayerPass],
                        calibration: CalibrationConfig, layers: list[int] | None,
                        overwrite: bool = False) -> bool:
    """Settle the output directory before spending minutes loading a model: True when
    ``output`` already holds this very result of ``model`` (as given to --model; a
    directory's casp section counts), the key :func:`run_stage` would compute. An output
    that holds something else is refused unless ``overwrite``
    (casp.checkpoint.check_output_dir)."""
    input_casp = read_casp_section(model) if Path(model).is_dir() else None
    key = fingerprint(stage_key(model, input_casp, stage, passes, calibration, layers))
    return check_output_dir(output, key, overwrite)


def run_stage(loaded: LoadedModel, stage: str, passes: list[LayerPass],
              calibration: CalibrationConfig, device: torch.device,
              output: str | Path | None = None, overwrite: bool = False,
              layers: list[int] | None = None, offload_activations: bool = False,
              progress: bool = True) -> StageResult:
    key_payload = stage_key(loaded.source, loaded.casp, stage, passes, calibration, layers)
    key = fingerprint(key_payload)
    state = progress_dir(output) if output is not None else None
    if output is not None and check_output_dir(output, key, overwrite):
        log.info("%s already holds this %s result; nothing to do", output, stage)
        shutil.rmtree(state, ignore_errors=True)
        return StageResult(output=Path(output), skipped=True)
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = calibration_batches(loaded, calibration)
    tokens = token_count(batches)
    log.info("calibration: %d batches, %d tokens from %s", len(batches), tokens,
             calibration.mm_data or calibration.dataset)
    store = torch.device("cpu") if offload_activations else device
    inputs = capture_layer_inputs(loaded.model, loaded.spec, batches, device, store)
    del batches
    result = run_layerwise(loaded.model, loaded.spec, inputs, passes, device, layers=layers,
                           state_dir=state, run_key=key_payload, progress=progress,
                           replace_foreign_progress=overwrite)
    seconds = time.perf_counter() - start
    stage_result = StageResult(output=None, changes=result.changes, seconds=seconds,
                               peak_rss_gb=peak_rss_gb(), calibration_tokens=tokens)
    if device.type == "cuda":
        stage_result.peak_cuda_gb = torch.cuda.max_memory_allocated(device) / 2**30
    settings = {"passes": {p.name: p.settings() for p in passes},
                "calibration": calibration.as_dict(), "layers": layers}
    if output is not None:
        section = build_section(loaded, stage, settings, key, result.changes, seconds)
        save_checkpoint(loaded, output, section, overwrite=overwrite)
        shutil.rmtree(state, ignore_errors=True)
        stage_result.output = Path(output)
        loaded.casp = section
    return stage_result
