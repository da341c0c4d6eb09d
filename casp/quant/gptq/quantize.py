"""GPTQ (Frantar et al., 2023), with per-module bits and group sizes.

For a linear W (out x in) with inputs X, GPTQ quantizes W column by column and spreads each
column's rounding error over the columns not yet quantized, weighted by the inverse of the
Hessian H = 2 X X^T / n of the layer-wise loss ||(W - Q) X||^2:

    H += damp * mean(diag H) * I;   U = upper Cholesky factor of H^-1
    for column j:   q_j = round(w_j);   e = (w_j - q_j) / U_jj;   W[:, j:] -= e U_j,j:

Columns are processed in lazy blocks (the update of later blocks is one matmul per block),
optionally in order of decreasing diag(H) ("act-order"). The grid is asymmetric min-max per
group of ``group_size`` consecutive input columns (per row when group_size is -1); with
act-order a group is ``group_size`` consecutive columns of the processing order, unless
``static_groups`` fixes the groups on the original order before quantizing.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from casp.errors import CaspError
from casp.stats import inverse_hessian_cholesky

log = logging.getLogger("casp")

SCALE_BITS = 16     # each group stores an fp16 scale and an fp16 zero point
ZERO_BITS = 16
G_IDX_BITS = 16     # with dynamic act-order groups: the group of every input column


def effective_group_size(in_features: int, group_size: int | None) -> int:
    """The group size actually used: -1 / None (per channel) or a size >= in_features means
    one group per row. The last group may be shorter when group_size does not divide
    in_features (as in the reference GPTQ); its scale and zero are counted in full."""
    if group_size in (None, -1) or group_size >= in_features:
        return in_features
    if group_size < 1:
        raise CaspError(f"group size {group_size} is invalid; use a positive size such as 128, "
                        "or -1 for one group per output channel")
    return group_size


def stored_bits(out_features: int, in_features: int, bits: int, group_size: int | None,
                g_idx: bool = False) -> int:
    """Bits that a GPTQ-quantized linear occupies on disk in casp's format: packed codes,
    an fp16 scale and an fp16 zero per group and row, and (dynamic act-order groups) a
    16-bit group index per input column."""
    groups = math.ceil(in_features / effective_group_size(in_features, group_size))
    total = out_features * in_features * bits + out_features * groups * (SCALE_BITS + ZERO_BITS)
    return total + (in_features * G_IDX_BITS if g_idx else 0)


def described_bits(description: dict) -> int:
    """:func:`stored_bits` of a GPTQ module from its checkpoint description."""
    d = description
    return stored_bits(d["out_features"], d["in_features"], d["bits"], d["group_size"],
                       d.get("g_idx", False))


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise CaspError(f"{bits} bits is outside what casp quantizes to; use 2 to 8 bits")


def minmax_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max grid of each row of ``w`` [rows, cols]: (scale, zero), zero an
    integer in [0, 2^bits - 1]. The range always includes 0, as in the reference GPTQ."""
    maxq = 2**bits - 1
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    flat = lo == hi
    lo = torch.where(flat, torch.full_like(lo, -1), lo)
    hi = torch.where(flat, torch.full_like(hi, 1), hi)
    # scales are stored in fp16: fit with the stored value so codes match what is stored
    scale = ((hi - lo) / maxq).clamp_min(2**-24).to(torch.float16).to(w.dtype)
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
                     ) -> torch.Tensor:
    """Integer codes of ``w`` on the grid (scale, zero broadcast against w)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int | None = 128
                 ) -> torch.Tensor:
    """Round-to-nearest on the same grid as GPTQ: the dequantized weight (the baseline GPTQ
    must never be worse than in H-weighted error)."""
    out_f, in_f = weight.shape
    g = effective_group_size(in_f, group_size)
    w = weight.float()
    result = torch.empty_like(w)
    for start in range(0, in_f, g):
        block = w[:, start:start + g]
        scale, zero = minmax_grid(block, bits)
        q = quantize_to_grid(block, scale[:, None], zero[:, None], bits)
        result[:, start:start + g] = scale[:, None] * (q - zero[:, None])
    return result


@dataclass
class GPTQResult:
    codes: torch.Tensor        # uint8 [out, in], original column order
    scales: torch.Tensor       # float32 [out, groups]
    zeros: torch.Tensor        # float32 [out, groups] (integer values)
    g_idx: torch.Tensor | None  # int64 [in]: group of each column (dynamic act-order only)
    group_size: int            # effective group size

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.group_size, self.g_idx)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """W = scale * (code - zero), each column with its group's scale and zero."""
    in_f = codes.shape[1]
    if g_idx is None:
        index = torch.arange(in_f, device=codes.device) // group_size
    else:
        index = g_idx.to(device=codes.device, dtype=torch.long)
    s = scales.float()[:, index]
    z = zeros.float()[:, index]
    return s * (codes.float() - z)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int,
                  group_size: int | None = 128, act_order: bool = True,
                  static_groups: bool = False, damp: float = 0.01, block_size: int = 128
                  ) -> GPTQResult:
    """Quantize ``weight`` [out, in] with the Hessian ``hessian`` [in, in] of its inputs.
    Runs on the tensors' device in float32."""
    check_bits(bits)
    device = weight.device
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=device, dtype=torch.float32).clone()
    out_f, in_f = W.shape
    g = effective_group_size(in_f, group_size)
    n_groups = math.ceil(in_f / g)
    maxq = 2**bits - 1

    dead = H.diagonal() == 0          # inputs that are always zero: nothing to fit
    H[dead, dead] = 1
    W[:, dead] = 0

    scales = torch.empty(out_f, n_groups, device=device)
    zeros = torch.empty(out_f, n_groups, device=device)
    # dynamic groups (the reference GPTQ): a group's grid is fitted when its first column is
    # reached, on the weights as updated by the errors of earlier columns; static groups are
    # fitted on the original weights up front
    dynamic = not static_groups
    if not dynamic:
        for k in range(n_groups):
            scales[:, k], zeros[:, k] = minmax_grid(W[:, k * g:(k + 1) * g], bits)

    perm = torch.argsort(H.diagonal(), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    # group of each processed position: consecutive positions for dynamic groups (with
    # act-order these are columns of the processing order), else the original column's
    if dynamic or perm is None:
        pos_group = torch.arange(in_f, device=device) // g
    else:
        pos_group = perm // g
    pos_group_list = pos_group.tolist()

    U = inverse_hessian_cholesky(H, damp, "GPTQ")
    # work on W^T [in, out]: the column being quantized and the rank-1 updates of the
    # columns after it are contiguous rows
    WT = W.T.contiguous()
    codes = torch.empty(in_f, out_f, device=device)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = WT[i1:i2].clone()
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            k = pos_group_list[j]
            if dynamic and j % g == 0:
                # the group's columns as they are now (errors of earlier columns included)
                span = torch.cat([W1[i:], WT[i2:]], dim=0)[:g]
                scales[:, k], zeros[:, k] = minmax_grid(span.T, bits)
            w = W1[i]
            q = torch.clamp(torch.round(w / scales[:, k]) + zeros[:, k], 0, maxq)
            codes[j] = q
            err = (w - scales[:, k] * (q - zeros[:, k])) / U1[i, i]
            W1[i:].addr_(U1[i, i:], err, alpha=-1)
            E1[i] = err
        WT[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1)
    codes = codes.T

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if dynamic:    # groups are sets of permuted columns: record each column's group
            g_idx = pos_group[inv]
    return GPTQResult(codes=codes.to(torch.uint8), scales=scales, zeros=zeros, g_idx=g_idx,
                      group_size=g)


def weighted_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative layer-output error ||(W - Q) X||_F / ||W X||_F for inputs with Hessian
    (any multiple of) X X^T."""
    w = weight.to(hessian.dtype)
    d = w - approx.to(hessian.dtype)
    num = torch.einsum("ij,jk,ik->", d, hessian, d)
    den = torch.einsum("ij,jk,ik->", w, hessian, w)
    return math.sqrt(max(num.item(), 0.0) / max(den.item(), 1e-300))
