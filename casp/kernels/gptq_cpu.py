"""GPTQ codes times activations on the CPU, from a SIMD layout of the stored codes.

Dequantization is W[r, c] = s[r, g] * (q[r, c] - z[r, g]) with g the group of column c, so
for an input x

    y[r] = sum_g s[r, g] * (sum_{c in g} q[r, c] x[c]  -  z[r, g] * sum_{c in g} x[c]),

integer codes times x inside a group, one scale and one zero point per group, and the group
sums of x computed once per call for all rows.

The kernel layout (built once per module from casp's packed stream; the same number of
bytes, plus rows of zeros up to a multiple of 16): a b-bit code is split into bit planes
of widths 2 and 1 (3 = 2 + 1, 4 = 2 + 2, 5 = 2 + 2 + 1, ...), q = sum_p
plane_p << shift_p, so sum_c q x = sum_p 2^shift_p sum_c plane_p x. Rows are taken 16 at a
time (one block): for a plane of width w, byte [block, k, lane] holds the 8 / w codes of
row 16 * block + lane at columns k * 8 / w, k * 8 / w + 1, ... (first column in the top
bits). The inner loop then loads 16 bytes, one per row, and multiplies them with a few
broadcast inputs: 16 rows in one vector, whatever the group boundaries. Measured on this
project's AVX-512 CPU: about 0.1 ns per 2-bit weight and thread, 5x faster than decoding
each row's consecutive codes.

Columns are taken in the kernel's order (for act-order group indices, sorted by group, see
casp.quant.gptq.linear), so every group is a contiguous range whose length is a multiple
of 8. Work is split over the row blocks (``prange``); each output is summed by one thread
in a fixed order, so results do not depend on the thread count.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

LANES = 16

# planes of 2 and 1 bits only: measured per plane on a 1536 x 576 matrix (one thread),
# widths 1, 2, 4, 8 took 114, 119, 466, 308 us (the wider bodies vectorise badly), so a
# 4-bit code runs as two 2-bit planes
PLANE_WIDTHS = {1: (1,), 2: (2,), 3: (2, 1), 4: (2, 2), 5: (2, 2, 1), 6: (2, 2, 2),
                7: (2, 2, 2, 1), 8: (2, 2, 2, 2)}


def plane_layout(codes: np.ndarray, bits: int):
    """codes uint8 [out, in] (kernel column order) -> (packed uint8 [blocks, in * bits / 8,
    16], widths int64, shifts int64, offsets int64: where each plane starts along axis 1)."""
    n_out, n_in = codes.shape
    n_blocks = -(-n_out // LANES)
    padded = np.zeros((n_blocks * LANES, n_in), dtype=np.uint8)
    padded[:n_out] = codes
    widths, shifts, offsets, parts = PLANE_WIDTHS[bits], [], [], []
    shift, offset = bits, 0
    for w in widths:
        shift -= w
        per_byte = 8 // w
        plane = ((padded >> shift) & ((1 << w) - 1)).reshape(n_blocks, LANES,
                                                              n_in // per_byte, per_byte)
        byte = np.zeros((n_blocks, LANES, n_in // per_byte), dtype=np.uint8)
        for k in range(per_byte):
            byte |= plane[..., k] << np.uint8(w * (per_byte - 1 - k))
        parts.append(byte.transpose(0, 2, 1))
        shifts.append(shift)
        offsets.append(offset)
        offset += n_in // per_byte
    packed = np.ascontiguousarray(np.concatenate(parts, axis=1))
    return (packed, np.array(widths, np.int64), np.array(shifts, np.int64),
            np.array(offsets, np.int64))


@njit(parallel=True, fastmath=True, cache=True)
def gptq_matmul(x_in, columns, packed, widths, shifts, offsets, starts, scales, zeros, y):
    """y[b, r] (float32 [B, out]) for x_in float32 [B, in]: its columns taken in kernel
    order (``columns``, int64, the input feature of each kernel column; empty: the natural
    order), the layout of ``plane_layout``, starts int64 [groups + 1] (column ranges of the
    groups), scales / zeros float32 [blocks * 16, groups] (padded rows: anything)."""
    if columns.shape[0]:
        x = np.empty_like(x_in)
        for b in range(x.shape[0]):
            for c in range(x.shape[1]):
                x[b, c] = x_in[b, columns[c]]
    else:
        x = x_in
    group_sums = np.empty((x.shape[0], starts.shape[0] - 1), np.float32)
    _group_sums(x, starts, group_sums)
    n_b = x.shape[0]
    n_out = y.shape[1]
    n_blocks = packed.shape[0]
    n_groups = starts.shape[0] - 1
    n_planes = widths.shape[0]
    for blk in prange(n_blocks):
        total = np.zeros((n_b, LANES), np.float32)
        acc = np.empty((n_b, LANES), np.float32)
        part = np.empty(LANES, np.float32)
        for g in range(n_groups):
            c0 = starts[g]
            c1 = starts[g + 1]
            acc[:] = 0.0
            for i in range(n_planes):
                w = widths[i]
                per = 8 // w
                k0 = offsets[i] + c0 // per
                k1 = offsets[i] + c1 // per
                factor = np.float32(1 << shifts[i])
                for b in range(n_b):
                    part[:] = 0.0
                    # one loop per width, written out: the 16-lane body must be visible
                    # to the vectoriser
                    if w == 2:
                        for k in range(k0, k1):
                            c = (k - offsets[i]) * 4
                            x0 = x[b, c]
                            x1 = x[b, c + 1]
                            x2 = x[b, c + 2]
                            x3 = x[b, c + 3]
                            pk = packed[blk, k]
                            for lane in range(LANES):
                                v = pk[lane]
                                part[lane] += (np.float32(v >> 6) * x0
                                               + np.float32((v >> 4) & 3) * x1
                                               + np.float32((v >> 2) & 3) * x2
                                               + np.float32(v & 3) * x3)
                    else:                                    # w == 1
                        for k in range(k0, k1):
                            c = (k - offsets[i]) * 8
                            xs = x[b, c:c + 8]
                            pk = packed[blk, k]
                            for lane in range(LANES):
                                v = pk[lane]
                                part[lane] += (np.float32(v >> 7) * xs[0]
                                               + np.float32((v >> 6) & 1) * xs[1]
                                               + np.float32((v >> 5) & 1) * xs[2]
                                               + np.float32((v >> 4) & 1) * xs[3]
                                               + np.float32((v >> 3) & 1) * xs[4]
                                               + np.float32((v >> 2) & 1) * xs[5]
                                               + np.float32((v >> 1) & 1) * xs[6]
                                               + np.float32(v & 1) * xs[7])
                    for lane in range(LANES):
                        acc[b, lane] += factor * part[lane]
            r0 = blk * LANES
            for b in range(n_b):
                gs = group_sums[b, g]
                for lane in range(LANES):
                    total[b, lane] += scales[r0 + lane, g] * (acc[b, lane]
                                                              - zeros[r0 + lane, g] * gs)
        for lane in range(min(LANES, n_out - blk * LANES)):
            for b in range(n_b):
                y[b, blk * LANES + lane] = total[b, lane]


@njit(parallel=True, fastmath=True, cache=True)
def gptq_dequantize_rows(packed, widths, shifts, offsets, starts, scales, zeros, first_row,
                         out):
    """Rows first_row .. first_row + len(out) of the dequantized weight (kernel column
    order) into out float32 [rows, in]: the tile of the prefill path."""
    n_rows, n_in = out.shape
    n_groups = starts.shape[0] - 1
    n_planes = widths.shape[0]
    for i in prange(n_rows):
        r = first_row + i
        blk = r // LANES
        lane = r % LANES
        dest = out[i]
        dest[:] = 0.0
        for k in range(n_planes):
            w = widths[k]
            per = 8 // w
            mask = (1 << w) - 1
            factor = np.float32(1 << shifts[k])
            for j in range(n_in // per):
                v = packed[blk, offsets[k] + j, lane]
                for t in range(per):
                    dest[j * per + t] += factor * np.float32((v >> (w * (per - 1 - t))) & mask)
        for g in range(n_groups):
            s = scales[r, g]
            sz = s * zeros[r, g]
            for c in range(starts[g], starts[g + 1]):
                dest[c] = s * dest[c] - sz


@njit(cache=True)
def _group_sums(x, starts, out):
    """out[b, g] = sum of x[b, starts[g]:starts[g + 1]] (float32 [B, groups])."""
    for b in range(x.shape[0]):
        for g in range(starts.shape[0] - 1):
            s = np.float32(0.0)
            for c in range(starts[g], starts[g + 1]):
                s += x[b, c]
            out[b, g] = s
