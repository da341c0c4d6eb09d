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

Residual codebooks (RVQ, the settings of casp.quant.quip.setting): E8P12RVQ3B = E8P12 then E81B on the scaled residual (3 bits),
E8P12RVQ4B = E8P12 then E8P12 on the scaled residual (4 bits).
"""
from __future__ import annotations

import itertools
from functools import lru_cache

import torch

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
    16-bit codes int64 [N]). On the CPU a numba kernel (casp.kernels.e8p_nearest) searches
    without the temporaries; elsewhere, or with CASP_KERNELS=0, torch in chunks."""
    from casp.kernels.packed_matmul import kernels_enabled

    if x.is_cpu and kernels_enabled():
        return _nearest_e8p_cpu(x)
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


def _nearest_e8p_cpu(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from casp.kernels.cpu_threads import sync_numba_threads
    from casp.kernels.e8p_nearest import nearest_e8p_codes

    sync_numba_threads()
    rows = x.detach().float().contiguous().numpy()
    codes = torch.empty(rows.shape[0], dtype=torch.int64)
    values = torch.empty(rows.shape, dtype=torch.float32)
    patterns = abs_patterns()
    nearest_e8p_codes(rows, patterns.numpy(), (patterns ** 2).sum(dim=1).numpy(),
                      pattern_parity().numpy(), codes.numpy(), values.numpy())
    return values, codes


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
