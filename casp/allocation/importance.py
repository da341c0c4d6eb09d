"""Stage 2, step 1: how much each decoder layer matters, from calibration data.

Each score is one function of a layer's input and output hidden states (one row per
token), returning the per-token values whose mean is the layer's importance:

    block_influence   BI_i = 1 - cos(h_in, h_out)        (the paper's; ShortGPT's block influence)
    relative_change   ||h_out - h_in|| / ||h_in||

A new score is one function and one entry in ``IMPORTANCE_SCORES``.
"""
from __future__ import annotations

import torch

from casp.errors import CaspError
from casp.layerwise import LayerContext, LayerPass


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """1 - cos(h_in, h_out) per token: how much the layer turns the hidden state."""
    return 1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)


def relative_change(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """||h_out - h_in|| / ||h_in|| per token: how far the layer moves the hidden state."""
    return (h_out - h_in).norm(dim=-1) / h_in.norm(dim=-1).clamp_min(1e-12)


# name -> per-token score of (input, output) rows, float64 [tokens, hidden] each
IMPORTANCE_SCORES = {"block_influence": block_influence, "relative_change": relative_change}
IMPORTANCE_METHODS = tuple(IMPORTANCE_SCORES)


class ImportancePass(LayerPass):
    """Scores every layer with one of ``IMPORTANCE_SCORES``; changes nothing.
    ``scores[i]`` after the walk."""

    name = "importance"

    def __init__(self, method: str = "block_influence"):
        if method not in IMPORTANCE_SCORES:
            raise CaspError(f"unknown importance {method!r}; use one of "
                            f"{', '.join(IMPORTANCE_SCORES)}")
        self.method = method
        self.scores: dict[int, float] = {}

    def settings(self) -> dict:
        return {"method": self.method}

    def process(self, ctx: LayerContext) -> None:
        score = IMPORTANCE_SCORES[self.method]
        outputs = ctx.forward()
        total, count = 0.0, 0
        for h_in, h_out in zip(ctx.inputs.hidden, outputs):
            per_token = score(h_in.reshape(-1, h_in.shape[-1]).double(),
                              h_out.reshape(-1, h_out.shape[-1]).double())
            total += per_token.sum().item()
            count += per_token.numel()
        self.scores[ctx.index] = total / max(count, 1)
        ctx.outputs = outputs
