"""Statistics of a linear's inputs, accumulated over calibration batches."""
from __future__ import annotations

import logging

import torch

from casp.errors import CaspError

log = logging.getLogger("casp")


class InputGram:
    """G = sum over tokens of x x^T, accumulated in float64 (x: the input of a linear).

    GPTQ's Hessian is 2 G / n and QuIP#'s proxy Hessian G / n, so later passes share this.
    """

    def __init__(self, dim: int, device: torch.device):
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        # each batch's product in float32 (twice as fast as float64 on CPUs, relative error
        # ~1e-6 over a batch), summed over batches in float64
        x = x.reshape(-1, x.shape[-1]).to(self.gram.device, torch.float32)
        self.gram += (x.T @ x).to(torch.float64)
        self.tokens += x.shape[0]

    def mean(self) -> torch.Tensor:
        return self.gram / max(self.tokens, 1)


def inverse_hessian_cholesky(h: torch.Tensor, damp: float, who: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1; dampening grows tenfold if
    H is still not positive definite (e.g. too few calibration tokens). GPTQ and SparseGPT
    both update weights along its rows; ``who`` names the caller in messages."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    base = h.diagonal().mean().item()
    for attempt in range(6):
        damped = h + (damp * 10**attempt) * base * eye
        low, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            # H^-1 = L^-T L^-1 from one triangular solve (much faster than cholesky_inverse)
            low_inv = torch.linalg.solve_triangular(low, eye, upper=False)
            upper, info = torch.linalg.cholesky_ex(low_inv.T @ low_inv, upper=True)
            if int(info) == 0:
                if attempt:
                    log.warning("%s: Hessian needed dampening %.3g (asked %.3g)",
                                who, damp * 10**attempt, damp)
                return upper
    raise CaspError(f"{who}: the calibration Hessian cannot be factorised (non-finite "
                    "activations?); check the model's outputs on the calibration data")
