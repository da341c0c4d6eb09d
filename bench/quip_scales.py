"""Measure the codebook scales of casp's QuIP# settings on Gaussian input.

An incoherent weight is close to i.i.d. Gaussian; before rounding, QuIP# scales it to an RMS
``scale`` and (for residual codebooks) multiplies the first stage's residual by
``resid_scale``. This script finds, on a grid, the values minimising the mean squared error
of unit-variance Gaussian vectors after rounding, and writes them to
bench/results/quip_scales.json (casp/quant/quip/setting.py's SETTINGS hold the result).

    python bench/quip_scales.py [--samples 200000]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from casp.quant.quip.setting import SETTINGS

RESULTS = Path(__file__).parent / "results" / "quip_scales.json"


def mse(setting, x: torch.Tensor) -> float:
    values, _ = setting.round(x * setting.scale)
    return float(((values / setting.scale - x) ** 2).mean())


def search(setting, x, scales, resid_scales):
    best = None
    for r in resid_scales:
        for s in scales:
            trial = replace(setting, scale=float(s), resid_scale=float(r))
            err = mse(trial, x)
            if best is None or err < best[0]:
                best = (err, float(s), float(r))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200_000, help="Gaussian 8-vectors")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.samples, 8, generator=g)
    rows = []
    for name, setting in SETTINGS.items():
        t = time.time()
        resid = [1.0] if len(setting.stages) == 1 else np.arange(1.5, 4.51, 0.25)
        err, s, r = search(setting, x, np.arange(0.80, 1.301, 0.05), resid)
        # refine around the coarse optimum
        fine_r = [r] if len(setting.stages) == 1 else np.arange(r - 0.2, r + 0.201, 0.02)
        err, s, r = search(setting, x, np.arange(s - 0.04, s + 0.041, 0.01), fine_r)
        rows.append({"codebook": name, "bits": setting.bits, "scale": round(s, 3),
                     "resid_scale": round(r, 3), "mse": err,
                     # the constants in casp/quant/quip/setting.py when the search ran, and their error
                     "mse_at_constants_before": mse(setting, x),
                     "constants_before": {"scale": setting.scale,
                                          "resid_scale": setting.resid_scale},
                     "samples": args.samples, "seconds": round(time.time() - t, 1),
                     "machine": platform.processor() or platform.machine()})
        print(json.dumps(rows[-1]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
