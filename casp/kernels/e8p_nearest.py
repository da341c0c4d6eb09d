"""QuIP#'s exact nearest E8P12 codeword on the CPU, one vector of 8 per iteration (numba).

The search of casp.quant.quip.codebooks.nearest_e8p, without its [N, 256, 8] temporaries:
for each shift t = +-1/4 and each of the 256 absolute-value patterns a, the best signs are
those of y = x - t; when their count breaks the pattern's parity the coordinate with the
smallest |y_i| a_i flips, which costs 2 |y_i| a_i of the inner product. The distance is
|y|^2 + |a|^2 - 2 <|y|, a> (minus the flip). Ties go to the first pattern, then to the +1/4
shift, as in the torch version. Rows are independent: the result does not depend on the
thread count. It is the whole cost of BlockLDLQ here (96% of a QuIP# layer in torch).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def nearest_e8p_codes(x, patterns, pattern_norms, parity, codes, values):
    """codes[r] = the 16-bit E8P12 code nearest to x[r], values[r] its codeword (x, values
    float32 [N, 8]; patterns float32 [256, 8], pattern_norms float32 [256], parity int64
    [256]; codes int64 [N])."""
    for r in prange(x.shape[0]):
        ay = np.empty(8, np.float32)
        best_d = np.float32(np.inf)
        best_code = best_signs = 0
        for shift_bit in range(2):
            t = np.float32(0.25) if shift_bit == 0 else np.float32(-0.25)
            yy = np.float32(0.0)
            negative = 0
            sign_bits = 0
            for i in range(8):
                y = x[r, i] - t
                yy += y * y
                ay[i] = abs(y)
                if y < 0:
                    negative += 1
                    sign_bits |= 1 << i
            for p in range(256):
                inner = np.float32(0.0)
                smallest = np.float32(np.inf)
                where = 0
                for i in range(8):
                    v = ay[i] * patterns[p, i]
                    inner += v
                    if v < smallest:
                        smallest = v
                        where = i
                broken = (negative + parity[p]) & 1
                if broken:
                    inner -= np.float32(2.0) * smallest
                d = yy + pattern_norms[p] - np.float32(2.0) * inner
                if d < best_d:
                    best_d = d
                    best_signs = sign_bits ^ (1 << where) if broken else sign_bits
                    # bits 15..8 the pattern, 7..1 the signs of coordinates 0..6, 0 the shift
                    best_code = (p << 8) | ((best_signs & 0x7F) << 1) | shift_bit
        codes[r] = best_code
        p = best_code >> 8
        t = np.float32(0.25) if (best_code & 1) == 0 else np.float32(-0.25)
        for i in range(8):
            sign = np.float32(-1.0) if (best_signs >> i) & 1 else np.float32(1.0)
            values[r, i] = patterns[p, i] * sign + t
