"""Statistics of a linear's inputs, accumulated over calibration batches."""
from __future__ import annotations

import torch


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
