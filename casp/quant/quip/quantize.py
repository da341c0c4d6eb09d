"""QuIP# (Tseng et al. 2024) for one linear: incoherence processing, BlockLDLQ rounding onto
an E8 lattice codebook.

With H the input second moment E[x x^T] (normalised by its mean diagonal and dampened by
``sigma_reg``), random sign vectors s_in, s_out and the fast orthogonal transforms M_in,
M_out of casp.quant.quip.hadamard:

    U_in = M_in diag(s_in),  U_out = M_out diag(s_out)
    W_r = U_out W U_in^T,    H_r = U_in H U_in^T          (incoherent: no outlier entries)
    W_r is scaled to RMS = the codebook's scale, rounded by BlockLDLQ, scaled back.

The proxy loss tr((W - Ŵ) H (W - Ŵ)^T) is unchanged by the rotations. BlockLDLQ: with the
block LDL decomposition H_r = L D L^T (L unit lower block-triangular, blocks of 8), the
column blocks are rounded from the last to the first, each after adding the error feedback
of the blocks already rounded: target_j = W_j + sum_{i>j} (W_i - Ŵ_i) L_ij. Then the loss is
exactly sum_j r_j D_j r_j^T, r_j the rounding residual of block j alone.

The model keeps Ŵ_r (codes), the signs and the scale; it computes
y = diag(s_out) M_out^T (Ŵ_r (M_in (s_in * x))).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from casp.errors import CaspError
from casp.quant.quip.codebooks import DIM
from casp.quant.quip.hadamard import random_signs, transform
from casp.quant.quip.setting import QuIPSetting

LAZY_BLOCK = 128


@dataclass
class QuIPResult:
    setting: QuIPSetting
    codes: list[torch.Tensor]        # per stage, int64 [out, in / 8]
    signs_in: torch.Tensor           # +-1 [in]
    signs_out: torch.Tensor          # +-1 [out]
    scale: float
    weight: torch.Tensor             # float32 [out, in], what the codes decode to
    relative_error: float            # tr(dW H dW^T) / tr(W H W^T)


def regularize(hessian: torch.Tensor, sigma_reg: float) -> torch.Tensor:
    """H / mean(diag H) + sigma_reg I (float64)."""
    h = hessian.double().clone()
    mean_diag = h.diagonal().mean()
    if not torch.isfinite(mean_diag) or mean_diag <= 0:
        raise CaspError("the Hessian has no positive diagonal (did the calibration data reach "
                        "this module?)")
    h /= mean_diag
    h.diagonal().add_(sigma_reg)
    return h


def rotate_weight(w: torch.Tensor, s_in: torch.Tensor, s_out: torch.Tensor) -> torch.Tensor:
    """U_out W U_in^T."""
    x = w * s_out[:, None] * s_in[None, :]
    x = transform(x)                                   # rows: W U_in^T
    return transform(x.T.contiguous()).T               # columns: M_out (.)


def unrotate_weight(wr: torch.Tensor, s_in: torch.Tensor, s_out: torch.Tensor) -> torch.Tensor:
    """U_out^T W_r U_in (the inverse of :func:`rotate_weight`)."""
    x = transform(wr, transpose=True)                  # rows: W_r M_in
    x = transform(x.T.contiguous(), transpose=True).T  # columns: M_out^T (.)
    return x * s_out[:, None] * s_in[None, :]


def rotate_hessian(h: torch.Tensor, s_in: torch.Tensor) -> torch.Tensor:
    """U_in H U_in^T."""
    x = h * s_in[:, None] * s_in[None, :]
    x = transform(x)
    return transform(x.T.contiguous()).T


def block_ldl(h: torch.Tensor, block: int = DIM) -> tuple[torch.Tensor, torch.Tensor]:
    """H = L D L^T with L unit lower block-triangular and D block diagonal (blocks of
    ``block``): (L [n, n], D as [n / block, block, block]). From the Cholesky factor C of H:
    L = C blockdiag(C_jj)^-1, D_j = C_jj C_jj^T."""
    n = h.shape[0]
    try:
        c = torch.linalg.cholesky(h)
    except RuntimeError:
        raise CaspError("the Hessian is not positive definite even after damping; raise "
                        "--sigma-reg")
    diag = c.view(n // block, block, n // block, block).diagonal(dim1=0, dim2=2)
    diag = diag.permute(2, 0, 1)                        # [blocks, b, b] = C_jj
    inv = torch.linalg.solve_triangular(diag, torch.eye(block, dtype=h.dtype,
                                                        device=h.device).expand_as(diag),
                                        upper=False)
    l = (c.view(n, n // block, block).transpose(0, 1) @ inv).transpose(0, 1).reshape(n, n)
    # zero the strictly upper part that round-off left, and make the diagonal blocks exact
    l = torch.tril(l)
    for j in range(n // block):
        s = slice(j * block, (j + 1) * block)
        l[s, s] = torch.eye(block, dtype=h.dtype, device=h.device)
    return l, diag @ diag.transpose(1, 2)


def block_ldlq(w: torch.Tensor, h: torch.Tensor, round_block, block: int = DIM
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """BlockLDLQ of ``w`` [out, n] (already scaled) under proxy Hessian ``h`` [n, n]:
    ``round_block(x [out, block])`` -> (values, [codes per stage]) rounds one column block.
    Returns (Ŵ, codes per stage as [out, n / block])."""
    out, n = w.shape
    if n % block:
        raise CaspError(f"{n} inputs are not a multiple of the block size {block}")
    l, _ = block_ldl(h, block)
    l = l.to(w.dtype)
    work = w.clone()
    q = torch.zeros_like(w)
    err = torch.zeros_like(w)
    nblocks = n // block
    codes: list[list[torch.Tensor | None]] = []
    for end in range(n, 0, -LAZY_BLOCK):
        start = max(0, end - LAZY_BLOCK)
        for j in range(end - block, start - 1, -block):
            cols = slice(j, j + block)
            target = work[:, cols]
            values, stage_codes = round_block(target)
            q[:, cols] = values
            err[:, cols] = w[:, cols] - values          # W_j - Ŵ_j, not the residual
            if not codes:
                codes = [[None] * nblocks for _ in stage_codes]
            for k, c in enumerate(stage_codes):
                codes[k][j // block] = c
            if j > start:
                work[:, start:j] += err[:, cols] @ l[cols, start:j]
        if start > 0:
            work[:, :start] += err[:, start:end] @ l[start:end, :start]
    return q, [torch.stack(c, dim=1) for c in codes]


def proxy_loss(dw: torch.Tensor, h: torch.Tensor) -> float:
    """tr(dW H dW^T)."""
    dw = dw.double()
    return float(((dw @ h.double()) * dw).sum())


def quip_quantize(weight: torch.Tensor, hessian: torch.Tensor, setting: QuIPSetting,
                  sigma_reg: float = 0.01, seed: int = 0) -> QuIPResult:
    """Quantize one weight [out, in] with QuIP# under Hessian ``hessian`` [in, in]."""
    out_f, in_f = weight.shape
    setting.check(out_f, in_f)
    device = weight.device
    g = torch.Generator().manual_seed(seed)
    s_in = random_signs(in_f, g).to(device)
    s_out = random_signs(out_f, g).to(device)
    h = regularize(hessian.to(device), sigma_reg)
    hr = rotate_hessian(h, s_in.double())
    w = weight.float()
    wr = rotate_weight(w, s_in, s_out)
    rms = float(wr.pow(2).mean().sqrt())
    if not math.isfinite(rms) or rms == 0:
        raise CaspError("the weight is all zeros or not finite; nothing to quantize")
    scale = float(torch.tensor(rms / setting.scale, dtype=torch.float32))   # as stored

    q, codes = block_ldlq(wr / scale, hr, setting.round)
    wr_hat = q * scale
    w_hat = unrotate_weight(wr_hat, s_in, s_out)
    h0 = hessian.double().to(device)
    base = proxy_loss(w, h0)
    rel = proxy_loss(w - w_hat, h0) / base if base > 0 else 0.0
    return QuIPResult(setting, codes, s_in, s_out, scale, w_hat, rel)
