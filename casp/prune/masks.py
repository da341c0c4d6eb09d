"""Which weights a pruning rule removes, without changing the others.

Scores (larger = kept), for a linear W [out, in] whose inputs x have Gram diagonal
G_jj = sum over calibration tokens of x_j^2:

    magnitude   |W_ij|
    wanda       |W_ij| * ||X_j||_2 = |W_ij| * sqrt(G_jj)                 (Sun et al., 2023)
    ria         log1p(|W_ij| / ||W_i,:||_2 + |W_ij| / ||W_:,j||_2) * (G_jj / n)^(1/4)
                the seed paper's default (its authors' code, "optspa"): a relative-importance
                score of each weight against its row and column, times an activation term

Masks compare scores within each output row: unstructured at ratio r zeroes the
int(in * r) lowest of every row; N:M zeroes the N lowest of every M consecutive inputs of a
row (2:4, 4:8: the pattern sparse tensor cores run). No weight is updated (SparseGPT,
which updates, is :mod:`casp.prune.sparsegpt`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from casp.errors import CaspError

SCORES = ("magnitude", "wanda", "ria")


@dataclass(frozen=True)
class Pattern:
    """What to prune of one linear: a ratio (unstructured) or N of every M (n, m set)."""

    ratio: float = 0.0
    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float:
        return self.n / self.m if self.structured else self.ratio

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.ratio:g}"


def check_ratio(ratio: float, what: str = "pruning ratio") -> float:
    if not 0 <= ratio < 1:
        raise CaspError(f"{what} {ratio} is outside [0, 1); give e.g. 0.5 for half the weights")
    return ratio


def parse_nm(text: str) -> tuple[int, int]:
    """ "2:4" -> (2, 4): N of every M consecutive weights of a row are zeroed."""
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise CaspError(f"--nm {text!r}: give N:M such as 2:4 or 4:8")
    if not 0 < n < m:
        raise CaspError(f"--nm {text}: N must be at least 1 and less than M (e.g. 2:4)")
    return n, m


def weight_scores(weight: torch.Tensor, score: str, gram_diag: torch.Tensor | None = None,
                  tokens: int = 0) -> torch.Tensor:
    """The score of every weight (float32 [out, in]); ``gram_diag`` (sum of x_j^2 over
    ``tokens`` calibration tokens) for the activation-aware scores."""
    w = weight.detach().float().abs()
    if score == "magnitude":
        return w
    if score not in SCORES:
        raise CaspError(f"unknown pruning score {score!r}; use one of {', '.join(SCORES)}")
    if gram_diag is None:
        raise CaspError(f"the {score} score needs calibration statistics")
    diag = gram_diag.to(w.device, torch.float32).clamp_min(0)
    if score == "wanda":
        return w * diag.sqrt()[None, :]
    rows = w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cols = w.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return torch.log1p(w / rows + w / cols) * (diag / max(tokens, 1)).pow(0.25)[None, :]


def row_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Each weight's rank within its row (0 = the lowest score), int16 where it fits: a mask
    at any ratio is then ``ranks >= int(in * ratio)`` (the search's fast mode keeps these)."""
    order = scores.argsort(dim=1, stable=True)
    dtype = torch.int16 if scores.shape[1] < 2**15 else torch.int32
    ranks = torch.empty_like(order, dtype=dtype)
    positions = torch.arange(scores.shape[1], device=scores.device, dtype=dtype)
    ranks.scatter_(1, order, positions.expand_as(order).contiguous())
    return ranks


def keep_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Boolean [out, in], True where a weight stays."""
    out_f, in_f = scores.shape
    if pattern.structured:
        n, m = pattern.n, pattern.m
        if in_f % m:
            raise CaspError(f"{n}:{m} sparsity needs the input size ({in_f}) to be a multiple "
                            f"of {m}")
        groups = scores.reshape(out_f, in_f // m, m)
        lowest = groups.topk(n, dim=2, largest=False).indices
        keep = torch.ones_like(groups, dtype=torch.bool)
        keep.scatter_(2, lowest, False)
        return keep.reshape(out_f, in_f)
    return row_ranks(scores) >= int(in_f * pattern.ratio)
