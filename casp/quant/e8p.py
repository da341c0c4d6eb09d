"""QuIP#'s lattice codebooks over groups of 8 weights.

E8P12 (2 bits per weight: 2^16 codewords of dimension 8). Start from the 256 "absolute value
patterns" a in {1/2, 3/2, 5/2, 7/2}^8: the 227 with |a|^2 <= 10 (the half-integer points of
E8 within radius sqrt(10), up to signs) and 29 chosen patterns of norm 12 (QuIP#'s list).
A codeword is s * a + t: signs s with an even coordinate sum (so s * a lies in E8; for each a
exactly 128 sign patterns do, the 8th sign is fixed by the other 7) and a shift t = +-1/4.
So the codebook is a subset of E8 + 1/4 with 256 * 128 * 2 = 65536 entries.

A code is 16 bits: bits 15..8 the pattern index, bits 7..1 the signs of coordinates 0..6
(1 = negative), bit 0 the shift (0: +1/4, 1: -1/4). Codes are stored as int16 (two's
complement of the 16-bit code).

Nearest-codeword search is exact without scanning the 65536 codewords: for each shift and
pattern the best signs are the signs of x - t, unless that breaks the parity, in which case
the best is to flip the coordinate with the smallest |x_i - t| a_i. That is 2 x 256 inner
products and minima per vector instead of 65536 distances.

E81B (1 bit per weight: 256 codewords of E8): the origin, the 240 roots of E8 (norm 2) and
15 of the 16 vectors +-2 e_i (all but -2 e_7), as in QuIP#. Searched by brute force.

Residual codebooks (RVQ): E8P12RVQ3B = E8P12 then E81B on the scaled residual (3 bits),
E8P12RVQ4B = E8P12 then E8P12 on the scaled residual (4 bits).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import CaspError

DIM = 8

# QuIP#'s 29 patterns of norm 12 (five 3/2 and three 1/2), in units of 1/2
_NORM12 = """
31113333 13113333 11313333 11133333 33313311 33313131 33311331 33313113 33311313 33311133
33133311 33133131 33131331 33133113 33131313 33131133 31333311 31333131 31331331 31333113
31331313 13331133 13333311 13333131 13331331 13333113 13331313 11331333 33113331
""".split()


@lru_cache(maxsize=None)
def abs_patterns() -> torch.Tensor:
    """The 256 absolute-value patterns, float32 [256, 8]: the 227 of norm^2 <= 10 in
    lexicographic order, then the 29 of norm 12."""
    small = [p for p in itertools.product((1, 3, 5, 7), repeat=DIM)
             if sum(v * v for v in p) <= 40]
    big = [tuple(int(c) for c in s) for s in _NORM12]
    patterns = torch.tensor(small + big, dtype=torch.float32) / 2
    assert patterns.shape == (256, DIM) and len(set(small + big)) == 256
    return patterns


@lru_cache(maxsize=None)
def pattern_parity() -> torch.Tensor:
    """For each pattern a, the parity of sum(a): the number of negative signs a codeword on
    it must have, mod 2 (int64 [256])."""
    return abs_patterns().sum(dim=1).round().long() % 2


def decode_e8p(codes: torch.Tensor) -> torch.Tensor:
    """Codewords of 16-bit codes (any integer dtype; int16 read as unsigned), float32
    [..., 8]."""
    c = codes.long() & 0xFFFF
    pattern = c >> 8
    sign7 = (c[..., None] >> torch.arange(1, DIM, device=c.device)) & 1
    last = (sign7.sum(-1) + pattern_parity().to(c.device)[pattern]) % 2
    neg = torch.cat([sign7, last[..., None]], dim=-1)
    shift = 0.25 - 0.5 * (c & 1).float()
    return abs_patterns().to(c.device)[pattern] * (1 - 2 * neg.float()) + shift[..., None]


@lru_cache(maxsize=None)
def _e8p_table_cpu() -> torch.Tensor:
    return decode_e8p(torch.arange(1 << 16))


@lru_cache(maxsize=8)
def e8p_table(device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """All 65536 codewords, float32 [65536, 8], row = code."""
    return _e8p_table_cpu().to(device)


def nearest_e8p(x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest E8P12 codeword of every row of x [N, 8] (float32): (codewords [N, 8],
    16-bit codes int64 [N])."""
    patterns = abs_patterns().to(x.device)
    parity = pattern_parity().to(x.device)
    pnorm = (patterns ** 2).sum(dim=1)
    x = x.float()
    values, codes = [], []
    for part in x.split(chunk):
        best_dist = best_code = None
        for shift_bit, t in ((0, 0.25), (1, -0.25)):
            y = part - t
            ay = y.abs()
            neg = y < 0
            prod = ay[:, None, :] * patterns[None]                    # [n, 256, 8]
            inner = prod.sum(-1)
            smallest, where = prod.min(-1)
            broken = (neg.sum(-1, keepdim=True) + parity[None]) % 2 == 1
            inner = inner - 2 * broken * smallest
            dist = (y * y).sum(-1, keepdim=True) + pnorm[None] - 2 * inner
            d, k = dist.min(dim=1)
            fix = broken.gather(1, k[:, None])[:, 0]
            flip = torch.nn.functional.one_hot(where.gather(1, k[:, None])[:, 0], DIM).bool()
            signs = neg ^ (flip & fix[:, None])
            bits = (signs[:, :DIM - 1].long() << torch.arange(1, DIM, device=x.device)).sum(-1)
            code = (k << 8) | bits | shift_bit
            if best_dist is None:
                best_dist, best_code = d, code
            else:
                better = d < best_dist
                best_dist = torch.where(better, d, best_dist)
                best_code = torch.where(better, code, best_code)
        codes.append(best_code)
        values.append(decode_e8p(best_code))
    return torch.cat(values), torch.cat(codes)


@lru_cache(maxsize=None)
def e81b_table() -> torch.Tensor:
    """The 256 codewords of E81B, float32 [256, 8]: 0, the 112 roots +-e_i +-e_j, the 128
    roots (+-1/2)^8 with an even number of minus signs, then 2 e_i and -2 e_i (i < 7)."""
    rows = [[0.0] * DIM]
    for i, j in itertools.combinations(range(DIM), 2):
        for si, sj in itertools.product((1, -1), repeat=2):
            v = [0.0] * DIM
            v[i], v[j] = float(si), float(sj)
            rows.append(v)
    for signs in itertools.product((0.5, -0.5), repeat=DIM):
        if sum(s < 0 for s in signs) % 2 == 0:
            rows.append(list(signs))
    for sign in (2.0, -2.0):
        for i in range(DIM if sign > 0 else DIM - 1):
            v = [0.0] * DIM
            v[i] = sign
            rows.append(v)
    table = torch.tensor(rows)
    assert table.shape == (256, DIM)
    return table


def nearest_in(x: torch.Tensor, table: torch.Tensor, chunk: int = 16384
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force nearest row of ``table`` for every row of x: (values, indices int64)."""
    table = table.to(x.device)
    norms = (table ** 2).sum(dim=1)
    idx = torch.cat([(2 * part.float() @ table.T - norms).argmax(dim=1)
                     for part in x.split(chunk)])
    return table[idx], idx


# ----------------------------------------------------------------------------- settings

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
        from .hadamard import decompose

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
