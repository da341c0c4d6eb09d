"""Stage 1: data-aware (whitened) low-rank factorisation of W_q and W_k.

For a linear W (out x in) whose inputs X (in x tokens) have Gram matrix G = X X^T = S S^T
(S lower-triangular, Cholesky), the rank-r W' minimising ||(W - W') X||_F is obtained from
the SVD W S = U Sigma V^T:  W' = U_r Sigma_r V_r^T S^-1. The factors are balanced,
up = U_r Sigma_r^(1/2) and down = Sigma_r^(1/2) V_r^T S^-1, so that neither carries all the
dynamic range (they are quantized later).
"""
from __future__ import annotations

import logging
import math
from fractions import Fraction

import torch
from torch import nn

from casp.errors import CaspError
from casp.layerwise import LayerContext, LayerPass
from casp.modules import register_module_type

log = logging.getLogger("casp")


def rank_for_compression(out_features: int, in_features: int, compression: float) -> int:
    """Rank that keeps a fraction (1 - compression) of the dense parameter count:
    r = floor(rho * out * in / (out + in)), rho = 1 - compression."""
    # exact arithmetic: 1 - 0.8 in floats is 0.19999..., which would lose one rank
    rho = 1 - Fraction(str(compression))
    return max(1, math.floor(rho * out_features * in_features / (out_features + in_features)))


def saves_parameters(out_features: int, in_features: int, rank: int) -> bool:
    return 0 < rank and rank * (out_features + in_features) < out_features * in_features


def whitening_factor(gram: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor S of G (G = S S^T), in float64. If G is not positive definite
    (too few tokens, dead channels), shift it by (-lambda_min + eps) I and retry, eps = 1e-6
    first (G is the per-token mean, so this is relative to the activations' scale), growing
    tenfold while rounding still defeats the factorisation."""
    g = gram.to(torch.float64)
    factor, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return factor
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    lam_min = torch.linalg.eigvalsh(g)[0].item()
    eps = 1e-6 * max(1.0, g.diagonal().abs().mean().item())
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(g + (-lam_min + eps) * eye)
        if int(info) == 0:
            log.debug("Gram not positive definite (lambda_min %.3g): added %.3g I",
                      lam_min, -lam_min + eps)
            return factor
        eps *= 10
    raise CaspError("the calibration Gram matrix cannot be factorised (non-finite "
                    "activations?); check the model's outputs on the calibration data")


def _balanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def truncation_error(singular_values: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of keeping the first ``rank`` singular values."""
    energy = singular_values.pow(2)
    return (energy[rank:].sum() / energy.sum().clamp_min(1e-300)).sqrt().item()


def whitened_factors(weight: torch.Tensor, gram: torch.Tensor, rank: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`whitened_svd` plus the singular values of W S (their tail is the error)."""
    w = weight.to(torch.float64)
    s_factor = whitening_factor(gram.to(w.device))
    u, s, vh = torch.linalg.svd(w @ s_factor, full_matrices=False)
    up, down_white = _balanced(u, s, vh, rank)
    # down = down_white @ S^-1, i.e. solve down @ S = down_white (S lower-triangular)
    down = torch.linalg.solve_triangular(s_factor, down_white, upper=False, left=False)
    return up, down, s


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor, rank: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (up: out x r, down: r x in), float64, with up @ down the rank-r matrix that
    minimises ||(W - W') X||_F for inputs with Gram matrix ``gram``."""
    up, down, _ = whitened_factors(weight, gram, rank)
    return up, down


def plain_factors(weight: torch.Tensor, rank: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
    return (*_balanced(u, s, vh, rank), s)


def plain_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of W itself (no data): the baseline whitening is compared with."""
    up, down, _ = plain_factors(weight, rank)
    return up, down


@register_module_type
class LowRankLinear(nn.Module):
    """y = up(down(x)): a dense linear replaced by two thin ones."""

    type_name = "lowrank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype) -> "LowRankLinear":
        module = cls(down.shape[1], up.shape[0], up.shape[1], bias is not None, dtype=dtype,
                     device=up.device)
        with torch.no_grad():
            module.up.weight.copy_(up)
            module.down.weight.copy_(down)
            if bias is not None:
                module.up.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent (for analysis; not used in the forward pass)."""
        return self.up.weight @ self.down.weight

    def describe(self) -> dict:
        return {"type": self.type_name, "in_features": self.in_features,
                "out_features": self.out_features, "rank": self.rank,
                "bias": self.up.bias is not None}

    @classmethod
    def from_description(cls, d: dict, dtype: torch.dtype | None = None) -> "LowRankLinear":
        return cls(d["in_features"], d["out_features"], d["rank"], d.get("bias", False),
                   dtype=dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


METHODS = ("whitened", "plain")


class LowRankPass(LayerPass):
    """Replace each target linear (W_q and W_k by default) with its rank-r factorisation.

    Args:
        compression: fraction of each matrix's parameters removed (paper: 0.75).
        method: "whitened" (data-aware, the CASP/SVD-LLM method) or "plain" truncated SVD.
        ranks: optional per-module ranks by full module name
            (e.g. {"model.layers.3.self_attn.q_proj": 96}); a rank that would not save
            parameters keeps the module dense.
        targets: module names relative to a layer (default: the spec's W_q and W_k).
        rank_multiple: round ranks from ``compression`` down to a multiple of this (at least
            one multiple), so that quantizers with input groups (AQLM's 8) can code the
            ``up`` factor, whose input is the rank.
        only_ranked: factorise only the modules ``ranks`` names; keep the others dense (a
            measured plan's choice).
    """

    name = "lowrank"

    def __init__(self, compression: float = 0.75, method: str = "whitened",
                 ranks: dict[str, int] | None = None, targets: tuple[str, ...] | None = None,
                 propagate: str = "transformed", rank_multiple: int = 1,
                 only_ranked: bool = False):
        if rank_multiple < 1:
            raise CaspError(f"rank multiple {rank_multiple} must be at least 1")
        self.rank_multiple = rank_multiple
        self.compression = compression
        self.method = method
        self.ranks = dict(ranks or {})
        self.targets = targets
        self.propagate = propagate
        self.only_ranked = only_ranked

    def settings(self) -> dict:
        return {"compression": self.compression, "method": self.method, "ranks": self.ranks,
                "targets": list(self.targets) if self.targets else None,
                "propagate": self.propagate,
                # only when set, so fingerprints of earlier runs stay valid
                **({"rank_multiple": self.rank_multiple} if self.rank_multiple != 1 else {}),
                **({"only_ranked": True} if self.only_ranked else {})}

    def rank_for(self, full_name: str, out_features: int, in_features: int) -> int:
        if full_name in self.ranks:
            return int(self.ranks[full_name])
        if self.only_ranked:
            return 0                             # saves nothing: stays dense
        rank = rank_for_compression(out_features, in_features, self.compression)
        m = self.rank_multiple
        return max(m, rank // m * m)

    def process(self, ctx: LayerContext) -> None:
        targets = self.targets or ctx.spec.lowrank_targets
        grams = ctx.input_grams(targets) if self.method == "whitened" else {}
        for name in targets:
            linear = ctx.module(name)
            if not isinstance(linear, nn.Linear):
                raise CaspError(f"{ctx.full_name(name)} is already a {type(linear).__name__}, not "
                                "a dense linear; run the low-rank stage on the original model")
            out_f, in_f = linear.weight.shape
            rank = self.rank_for(ctx.full_name(name), out_f, in_f)
            if not saves_parameters(out_f, in_f, rank):
                if not self.only_ranked:
                    log.info("%s: rank %d saves nothing, kept dense", ctx.full_name(name), rank)
                continue
            w = linear.weight.data
            if self.method == "whitened":
                # the per-token mean: same factors' product, scale independent of the token
                # count, so the balanced factors have a stable range for quantization
                gram = grams[name].mean()
                up, down, spectrum = whitened_factors(w.to(gram.device), gram, rank)
            else:
                up, down, spectrum = plain_factors(w, rank)
            bias = linear.bias.data if linear.bias is not None else None
            ctx.replace(name, LowRankLinear.from_factors(up.to(w.device), down.to(w.device),
                                                         bias, w.dtype))
            # recorded with the module: ||(W - W') X|| / ||W X|| on the calibration inputs
            # (whitened) or ||W - W'|| / ||W|| (plain); free from the spectrum
            ctx.changes[ctx.full_name(name)]["relative_error"] = round(
                truncation_error(spectrum, rank), 6)
