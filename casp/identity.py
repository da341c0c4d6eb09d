"""What a result is of: the one place casp names a run's identity and checks it on resume.

A stage, a search or a Hessian collection is identified by a JSON-able payload (its input,
its passes and their settings, its calibration); :func:`fingerprint` hashes it. Every resume
check compares fingerprints or identities made here:

- a checkpoint directory and a stage's progress folder (:func:`stage_key`, read by
  casp.pipeline and casp.layerwise);
- the measured search's record of measurements (casp.allocation.search);
- a directory of QuIP# Hessians (:func:`model_identity`, casp.quant.quip.hessians);
- a cached mini-LLaVA build against the projector weights casp ships (:func:`file_sha256`,
  casp.mini_llava.build).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from casp.hf_model import read_casp_section


def fingerprint(payload) -> str:
    """A short, stable hash of a JSON-able payload (keys sorted; other objects by str)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex): what identifies a weights file casp ships."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def stage_key(source: str, input_casp: dict | None, stage: str, passes: list,
              calibration, layers: list[int] | None) -> dict:
    """What identifies a stage's result: a rerun with the same key has nothing to do.
    ``passes`` are LayerPass objects (their name and settings count), ``calibration`` a
    CalibrationConfig."""
    return {"source": source, "input_casp": (input_casp or {}).get("stages"), "stage": stage,
            "passes": [(p.name, p.settings()) for p in passes],
            "calibration": calibration.as_dict(), "layers": layers}


def model_identity(model: str) -> dict:
    """What identifies the weights a result is computed from: the model as given to
    --model (a resolved path, or the name) and the fingerprints of the casp stages that
    made it."""
    path = Path(model)
    section = read_casp_section(path) if path.is_dir() else None
    stages = [s.get("fingerprint") for s in (section or {}).get("stages", [])]
    return {"source": str(path.resolve()) if path.exists() else model, "stages": stages}
