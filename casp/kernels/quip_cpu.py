"""QuIP# codes times (already transformed) activations on the CPU, from the stored codes.

QuIP#'s forward is y = s_out * M_out^T (Ŵ_r (M_in (s_in * x))) (casp.quant.quip.linear):
the random signs and the fast orthogonal transforms act on the activations, and only the
middle product needs the weight. Ŵ_r = scale * (E8P[c1] + second(c2) / resid_scale) in
groups of 8 inputs, so for h = M_in (s_in * x)

    (Ŵ_r h)[r] = scale * sum_g <codeword(c1[r, g]) + codeword2(c2[r, g]) / resid_scale, h_g>.

An E8P12 code (casp.quant.quip.codebooks) is 16 bits: pattern p (bits 15..8) indexing 256
absolute-value patterns a_p, 7 sign bits, a shift bit t; the codeword is a_p * signs +/- 1/4,
the 8th sign fixed by parity. So

    <codeword, h_g> = <v_lo, h_g[0:4]> + <v_hi, h_g[4:8]>  +  (+/- 1/4) * sum_k h_g[k]

with v = a_p * signs. The halves v_lo, v_hi of the 2^15 unshifted codewords take only 512
distinct values (coordinates +-1/2, +-3/2, +-5/2; ``e8p_halves``). Once per call the kernel
computes the products of all 512 half-vectors with both halves of every input group (a table
of G * 2 * 512 floats, 2 * 512 * 8 multiply-adds per group, shared by all rows), and the
group sums of h; a code then costs two table loads and a few integer operations, instead
of 8 products with a codeword read from the 2 MiB codebook. The E81B residual codebook
(256 entries of 8) gets a table of its own, G * 256 products.

Work is split over blocks of output rows; each row is summed by one thread in a fixed
order, so results do not depend on the thread count.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import njit, prange

from casp.kernels.hadamard_cpu import transform_row

ROWS_PER_TASK = 16
NO_SECOND, SECOND_E8P, SECOND_TABLE = 0, 1, 2
HALVES = 512


@lru_cache(maxsize=None)
def e8p_halves() -> tuple[np.ndarray, np.ndarray]:
    """(halves float32 [4, 512]: the distinct 4-dimensional halves of the unshifted E8P
    codewords, one per column; index int32 [32768]: for code >> 1, its low half's column
    plus its high half's column << 16)."""
    from casp.quant.quip.codebooks import abs_patterns, pattern_parity

    patterns, parity = abs_patterns().numpy(), pattern_parity().numpy()
    q = np.arange(1 << 15)
    p = q >> 7
    sign_bits = (q[:, None] >> np.arange(7)) & 1                  # bits 7..1 of the code
    last = (sign_bits.sum(1) + parity[p]) & 1
    negative = np.concatenate([sign_bits, last[:, None]], axis=1)
    words = patterns[p] * (1 - 2 * negative)                      # [32768, 8]
    halves, inverse = np.unique(np.concatenate([words[:, :4], words[:, 4:]]), axis=0,
                                return_inverse=True)
    assert halves.shape[0] == HALVES
    inverse = inverse.reshape(-1)
    index = (inverse[:1 << 15] | (inverse[1 << 15:] << 16)).astype(np.int32)
    return np.ascontiguousarray(halves.T, dtype=np.float32), index


def code_pairs(codes: np.ndarray) -> np.ndarray:
    """int32 [G, out] for int16 E8P codes [out, G] (transposed: the kernel walks all rows
    of one input group): where the code's two terms are in a group's products table
    (``_half_products``), low half (with the shift) in bits 0-15, high half above."""
    _, index = e8p_halves()
    c = codes.astype(np.int64) & 0xFFFF
    pair = index[c >> 1]
    lo = (pair & 0xFFFF) + HALVES * (c & 1)
    hi = 2 * HALVES + (pair >> 16)
    return np.ascontiguousarray((lo | (hi << 16)).T, dtype=np.int32)


@njit(cache=True, fastmath=True, inline="always")
def _half_products(h, b, g, halves, t):
    """t[0:1536] for input group g of row b of h: entries i and 512 + i hold
    <halves[:, i], h_g[0:4]> + 1/4 and - 1/4 of sum(h_g), entry 1024 + i holds
    <halves[:, i], h_g[4:8]>."""
    o = 8 * g
    h0, h1, h2, h3 = h[b, o], h[b, o + 1], h[b, o + 2], h[b, o + 3]
    h4, h5, h6, h7 = h[b, o + 4], h[b, o + 5], h[b, o + 6], h[b, o + 7]
    quarter = np.float32(0.25) * (((h0 + h1) + (h2 + h3)) + ((h4 + h5) + (h6 + h7)))
    for i in range(HALVES):
        lo = halves[0, i] * h0 + halves[1, i] * h1 + halves[2, i] * h2 + halves[3, i] * h3
        t[i] = lo + quarter
        t[HALVES + i] = lo - quarter
        t[2 * HALVES + i] = (halves[0, i] * h4 + halves[1, i] * h5 + halves[2, i] * h6
                             + halves[3, i] * h7)


@njit(parallel=True, fastmath=True, cache=True)
def quip_matmul(x, s_in, base_in, pw_in, scale_in, halves, pairs_t, pairs2_t, codes2_t,
                book2_t, second, factor, scale, base_out, pw_out, scale_out, s_out, n_tasks,
                y_out):
    """The whole QuIP# product for a few rows x float32 [B, in]: h = M_in (s_in * x),
    z = scale * h @ decode(codes).T, y_out = s_out * M_out^T z (the transforms as
    casp.kernels.hadamard_cpu.transform_row takes them). Codes: the ``code_pairs`` of the
    codes, int32 [G, out]; pairs2_t those of an E8P residual stage, codes2_t the codes of
    an E81B one transposed [G, out] with book2_t its codebook transposed [8, 256] (any
    arrays for the kinds not used); factor = 1 / resid_scale; rows split into n_tasks
    blocks.

    Groups are the outer loop: each task builds the products table of one input group
    (1536 floats, in L1) and adds that group's term to all of its rows."""
    h = np.empty_like(x)
    # a local, not a module-level constant: a global array in this parallel kernel made
    # it 5x slower (measured: 159 against 32 us for 72 x 576)
    no_signs = np.empty(0, np.float32)
    buf_in = np.empty((base_in.shape[0], pw_in), np.float32)
    for b in range(x.shape[0]):
        transform_row(x, b, s_in, base_in, pw_in, scale_in, no_signs, buf_in, h[b])
    y = np.empty_like(y_out)
    n_b = h.shape[0]
    n_groups, n_out = pairs_t.shape
    rows_per_task = (n_out + n_tasks - 1) // n_tasks
    for task in prange(n_tasks):
        r0 = task * rows_per_task
        r1 = min(n_out, r0 + rows_per_task)
        acc = np.zeros((n_b, max(0, r1 - r0)), np.float32)
        acc2 = np.zeros((n_b, max(0, r1 - r0)), np.float32)
        t = np.empty(3 * HALVES, np.float32)
        t2 = np.empty(book2_t.shape[1], np.float32)
        for g in range(n_groups):
            row = pairs_t[g]
            for b in range(n_b):
                _half_products(h, b, g, halves, t)
                a = acc[b]
                a2 = acc2[b]
                # one loop per residual kind: a branch inside the loop costs time
                if second == NO_SECOND:
                    for r in range(r0, r1):
                        p = row[r]
                        a[r - r0] += t[p & 0xFFFF] + t[p >> 16]
                elif second == SECOND_E8P:
                    row2 = pairs2_t[g]
                    for r in range(r0, r1):
                        p = row[r]
                        p2 = row2[r]
                        a[r - r0] += t[p & 0xFFFF] + t[p >> 16]
                        a2[r - r0] += t[p2 & 0xFFFF] + t[p2 >> 16]
                else:
                    t2[:] = 0.0
                    for k in range(8):
                        hk = h[b, 8 * g + k]
                        col = book2_t[k]
                        for c in range(t2.shape[0]):
                            t2[c] += col[c] * hk
                    row2 = codes2_t[g]
                    for r in range(r0, r1):
                        a[r - r0] += t[row[r] & 0xFFFF] + t[row[r] >> 16]
                        a2[r - r0] += t2[row2[r]]
        for b in range(n_b):
            for r in range(r0, r1):
                y[b, r] = scale * (acc[b, r - r0] + np.float32(factor) * acc2[b, r - r0])
    buf_out = np.empty((base_out.shape[0], pw_out), np.float32)
    for b in range(n_b):
        transform_row(y, b, no_signs, base_out, pw_out, scale_out, s_out, buf_out, y_out[b])


@njit(parallel=True, fastmath=True, cache=True)
def quip_decode_rows(pairs_t, halves, pairs2_t, codes2_t, book2, second, factor, scale,
                     first_row, out):
    """Rows first_row .. first_row + len(out) of Ŵ_r into out float32 [rows, in]: the tile
    of the prefill path (book2: the E81B codebook [256, 8] for SECOND_TABLE)."""
    n_rows = out.shape[0]
    n_groups = pairs_t.shape[0]
    for i in prange(n_rows):
        r = first_row + i
        dest = out[i]
        dest[:] = 0.0
        for g in range(n_groups):
            o = 8 * g
            for stage in range(2 if second == SECOND_E8P else 1):
                p = pairs_t[g, r] if stage == 0 else pairs2_t[g, r]
                f = np.float32(1.0) if stage == 0 else np.float32(factor)
                lo = p & 0xFFFF
                hi = (p >> 16) - 2 * HALVES
                t = np.float32(0.25) if lo < HALVES else np.float32(-0.25)
                lo = lo % HALVES
                for k in range(4):
                    dest[o + k] += f * (halves[k, lo] + t)
                    dest[o + 4 + k] += f * (halves[k, hi] + t)
            if second == SECOND_TABLE:
                i2 = np.int64(codes2_t[g, r]) & 0xFF
                for k in range(8):
                    dest[o + k] += np.float32(factor) * book2[i2, k]
            for k in range(8):
                dest[o + k] *= scale
