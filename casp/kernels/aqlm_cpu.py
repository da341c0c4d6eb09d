"""AQLM codes times activations on the CPU (out_group_size 1), multi-threaded and exact.

AQLM stores W[r, g*d:(g+1)*d] = s[r] * sum_m C_m[b_{r,g,m}] (M codebooks of 2^B vectors of
dimension d = in_group_size), so

    y[r] = s[r] * sum_g sum_m < C_m[b_{r,g,m}], x_g >.

For codebooks of up to 2^8 entries (2x8, 3x8, 4x8, ...) the inner products of every
codeword with every input group are computed once per call, a table T[g, m, c] =
<C_m[c], x_g> of G * M * 256 floats (G * M * 256 * d multiply-adds, vectorised over c),
and each output is a sum of G * M table entries picked by its codes: one load per code, no
arithmetic on the codewords. For larger codebooks (1x16) the table would be bigger than the
weight, so each row sums its codewords and takes the dot product with its input group.

Work is split over blocks of output rows and every output is written by exactly one thread
(the aqlm package's numba kernel instead splits over input groups that all add into the
same outputs, which races with more than one thread); each row is summed in a fixed order,
so results do not depend on the thread count. Codes are read as unsigned (the aqlm layout
stores 0..2^B-1 as int8 / int16 two's complement).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

ROWS_PER_TASK = 16
TABLE_MAX_CODES = 256        # up to this codebook size the table kernel runs


@njit(parallel=True, fastmath=True, cache=True)
def codeword_products(x, books_t, table):
    """table[b, g, m, c] = <C_m[c], x_b[g*d:(g+1)*d]> for x float32 [B, in], books_t
    float32 [M, d, K] (the codebooks with the vector dimension before the code)."""
    n_b = x.shape[0]
    n_books, d, n_codes = books_t.shape
    n_groups = table.shape[1]
    for g in prange(n_groups):
        for b in range(n_b):
            for m in range(n_books):
                t = table[b, g, m]
                t[:] = 0.0
                for k in range(d):
                    xk = x[b, g * d + k]
                    col = books_t[m, k]
                    for c in range(n_codes):
                        t[c] += col[c] * xk


@njit(parallel=True, fastmath=True, cache=True)
def aqlm_table_matmul(table, codes, scales, y):
    """y float32 [B, out] from the table of ``codeword_products`` and codes uint8
    [out, groups, M]; scales float32 [out]."""
    n_b = table.shape[0]
    n_out, n_groups, n_books = codes.shape
    n_tasks = (n_out + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(n_tasks):
        for r in range(task * ROWS_PER_TASK, min(n_out, (task + 1) * ROWS_PER_TASK)):
            row = codes[r]
            for b in range(n_b):
                t = table[b]
                acc = np.float32(0.0)
                for g in range(n_groups):
                    for m in range(n_books):
                        acc += t[g, m, row[g, m]]
                y[b, r] = scales[r] * acc


@njit(cache=True, fastmath=True, inline="always")
def _codeword_sum(codes, codebooks, r, g, dest):
    """dest[0:d] = sum over the codebooks of the codewords of row r, group g."""
    dest[:] = codebooks[0, codes[r, g, 0]]
    for m in range(1, codebooks.shape[0]):
        cw = codebooks[m, codes[r, g, m]]
        for k in range(dest.shape[0]):
            dest[k] += cw[k]


@njit(parallel=True, fastmath=True, cache=True)
def aqlm_direct_matmul(x, codes, codebooks, scales, y):
    """y float32 [B, out] = x @ W.T for x float32 [B, in], codes unsigned [out, groups, M],
    codebooks float32 [M, K, d], scales float32 [out]: codewords summed per group."""
    n_b = x.shape[0]
    n_out, n_groups, n_books = codes.shape
    d = codebooks.shape[2]
    n_tasks = (n_out + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(n_tasks):
        w = np.empty(d, np.float32)
        acc = np.empty(n_b, np.float32)
        for r in range(task * ROWS_PER_TASK, min(n_out, (task + 1) * ROWS_PER_TASK)):
            acc[:] = 0.0
            for g in range(n_groups):
                _codeword_sum(codes, codebooks, r, g, w)
                for b in range(n_b):
                    xg = x[b, g * d:(g + 1) * d]
                    s = np.float32(0.0)
                    for k in range(d):
                        s += w[k] * xg[k]
                    acc[b] += s
            for b in range(n_b):
                y[b, r] = scales[r] * acc[b]


@njit(parallel=True, fastmath=True, cache=True)
def aqlm_dequantize_rows(codes, codebooks, scales, first_row, out):
    """Rows first_row .. first_row + len(out) of W into out float32 [rows, in]."""
    n_rows = out.shape[0]
    n_groups = codes.shape[1]
    d = codebooks.shape[2]
    for i in prange(n_rows):
        r = first_row + i
        s = scales[r]
        for g in range(n_groups):
            dest = out[i, g * d:(g + 1) * d]
            _codeword_sum(codes, codebooks, r, g, dest)
            for k in range(d):
                dest[k] *= s
