"""QuIP#'s orthogonal transform of activations on the CPU, one numba call per linear.

The transform of a dimension n = K * 2^m (casp.quant.quip.hadamard) is
M = (B / sqrt(K)) ⊗ (H_{2^m} / sqrt(2^m)): viewing a vector as K rows of 2^m, a
Walsh-Hadamard transform of every row (butterflies, Sylvester order) and then the K x K
matrix B on the left. For the few tokens of decoding the torch version of this costs tens of
microseconds of operator overhead per call (measured: 72, 115 us for n = 576, 1536 on one
thread), more than the quantized product itself; this kernel does the same arithmetic in
one pass per row (the signs multiplied in on the way), in float32, inside the QuIP# decode
kernel (casp.kernels.quip_cpu). For many rows (prefill) torch's batched version is as fast.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(fastmath=True, cache=True, inline="always")
def transform_row(x, b, signs, base, pw, scale, post_signs, buf, dest):
    """dest = post_signs * (base ⊗ H_pw) (signs * x[b]) * scale for row b of x float32
    [B, n]; signs, post_signs float32 [n] (or of length 0: none), base float32 [K, K] with
    K * pw = n (the transposed base for M^T: H is symmetric), buf float32 [K, pw] scratch."""
    n = x.shape[1]
    k_order = base.shape[0]
    for i in range(k_order):
        for j in range(pw):
            v = x[b, i * pw + j]
            if signs.shape[0]:
                v *= signs[i * pw + j]
            buf[i, j] = v
    half = pw // 2
    while half >= 1:
        for i in range(k_order):
            row = buf[i]
            for start in range(0, pw, 2 * half):
                for j in range(start, start + half):
                    a = row[j]
                    c = row[j + half]
                    row[j] = a + c
                    row[j + half] = a - c
        half //= 2
    for i in range(k_order):
        acc = dest[i * pw:(i + 1) * pw]
        for j in range(pw):         # loops, not acc[:] = 0: that would be a parallel
            acc[j] = 0.0            # region of its own inside a parallel kernel
        for t in range(k_order):
            f = scale * base[i, t]
            src = buf[t]
            for j in range(pw):
                acc[j] += f * src[j]
    if post_signs.shape[0]:
        for j in range(n):
            dest[j] *= post_signs[j]
