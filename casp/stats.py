"""Statistics of a linear's inputs, accumulated over calibration batches."""
from __future__ import annotations

import torch


class InputGram:
    """G = sum over tokens of x x^T, in float64 (x: the input of a linear).

    GPTQ's Hessian is 2 G / n and QuIP#'s proxy Hessian G / n, so later passes share this.
    """

    def __init__(self, dim: int, device: torch.device):
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.gram.device, torch.float64)
        self.gram.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def mean(self) -> torch.Tensor:
        return self.gram / max(self.tokens, 1)
