"""QuIP#'s setting as a plan sees it: a codebook (E8P12 alone, 2 bits, or with a residual
E81B / E8P12 stage, 3 / 4 bits), its scales, its checks (groups of 8 inputs, a fast
orthogonal transform for both dimensions) and what it stores (codes, one sign bit per input
and output, a float32 scale)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from casp.errors import CaspError
from casp.quant.quip.codebooks import DIM, e8p_table, e81b_table, nearest_e8p, nearest_in
from casp.quant.quip.hadamard import decompose


@dataclass(frozen=True)
class QuIPSetting:
    """A QuIP# codebook: E8P12 alone or with a residual stage.

    ``scale``: the RMS the incoherent weight is scaled to before rounding (the codebook's
    optimal scale for Gaussian input); ``resid_scale``: the factor the first stage's
    residual is multiplied by before the second stage rounds it."""
    name: str
    stages: tuple[str, ...]
    scale: float
    resid_scale: float = 1.0

    quantizer = "quip"

    @property
    def bits(self) -> int:
        return sum(STAGE_BITS[s] for s in self.stages)

    @classmethod
    def parse(cls, text: str) -> "QuIPSetting":
        key = str(text).strip().lower()
        if key not in SETTINGS:
            raise CaspError(f"QuIP# codebook {text!r} is unknown; use one of "
                            f"{', '.join(SETTINGS)} (2, 3 and 4 bits)")
        return SETTINGS[key]

    def check(self, out_features: int, in_features: int, name: str = "the module") -> None:
        if in_features % DIM:
            raise CaspError(f"QuIP# codebooks quantize groups of {DIM} inputs, which do not "
                            f"divide {name}'s {in_features} inputs (for low-rank factors, rerun "
                            f"casp lowrank with --rank-multiple {DIM})")
        for n in (in_features, out_features):
            try:
                decompose(n)
            except ValueError as exc:
                raise CaspError(f"{name}: no fast orthogonal transform for dimension {n} ({exc}); "
                                "QuIP# cannot quantize it")

    def cost(self, out_features: int, in_features: int) -> int:
        """Stored bits: the codes, the sign bits of the inputs and outputs (packed in whole
        bytes), a float32 scale."""
        signs = 8 * (-(-in_features // 8) + -(-out_features // 8))
        return out_features * in_features * self.bits + signs + 32

    def plan_entry(self) -> dict:
        return {"group_size": DIM, "quip_codebook": self.name}

    @classmethod
    def from_plan_entry(cls, entry: dict) -> "QuIPSetting":
        return cls.parse(entry["quip_codebook"])

    def round(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Round rows of x [N, 8] (already scaled): (values [N, 8], codes per stage)."""
        values, code = nearest_e8p(x)
        codes = [code]
        if len(self.stages) > 1:
            resid = (x - values) * self.resid_scale
            second, code2 = (nearest_e8p(resid) if self.stages[1] == "e8p"
                             else nearest_in(resid, e81b_table()))
            values = values + second / self.resid_scale
            codes.append(code2)
        return values, codes

    def decode(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Values [..., 8] of stored codes (one tensor per stage)."""
        first = e8p_table(codes[0].device)[codes[0].long() & 0xFFFF]
        if len(self.stages) == 1:
            return first
        if self.stages[1] == "e8p":
            second = e8p_table(codes[1].device)[codes[1].long() & 0xFFFF]
        else:
            second = e81b_table().to(codes[1].device)[codes[1].long() & 0xFF]
        return first + second / self.resid_scale


STAGE_BITS = {"e8p": 2, "e81b": 1}
# Scales measured here on Gaussian input (bench/quip_scales.py): the RMS to scale an
# incoherent weight to, and the residual scale, minimising the mean squared rounding error.
SETTINGS = {
    "e8p12": QuIPSetting("e8p12", ("e8p",), scale=1.03),
    "e8p12rvq3b": QuIPSetting("e8p12rvq3b", ("e8p", "e81b"), scale=0.98, resid_scale=2.04),
    "e8p12rvq4b": QuIPSetting("e8p12rvq4b", ("e8p", "e8p"), scale=0.89, resid_scale=3.87),
}
