"""SparseGPT (Frantar & Alistarh, 2023): prune a linear and update the weights it keeps so
that the layer's outputs on the calibration inputs change least.

For W [out, in] and inputs with Hessian H = 2 X X^T / n of the loss ||(W - W') X||^2:

    dead inputs (H_jj = 0): H_jj = 1, their weights zeroed
    H += damp * mean(diag H) * I;   U = upper Cholesky factor of H^-1
    columns in blocks of 128; for each block, the mask: the lowest w^2 / U_jj^2 of the whole
        rows x block (unstructured: exactly int(numel * ratio) of them), or, for N:M, the N
        lowest of each row in every group of M columns, chosen when the group is reached
    column j of the block: w' = w masked;  e = (w - w') / U_jj;  W[:, j:] -= e U_j,j:
    after the block: the columns to its right get the block's errors in one matmul

Written from the paper's algorithm; the same dampened inverse-Hessian factor as GPTQ
(:func:`casp.stats.inverse_hessian_cholesky`).
"""
from __future__ import annotations

import torch

from casp.prune.masks import Pattern
from casp.stats import inverse_hessian_cholesky


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern,
                    damp: float = 0.01, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(the pruned, updated weight float32 [out, in], its keep mask)."""
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    out_f, in_f = W.shape
    if pattern.structured and block_size % pattern.m:
        block_size = pattern.m * max(1, block_size // pattern.m)
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    U = inverse_hessian_cholesky(H, damp, "SparseGPT")
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        E1 = torch.zeros_like(W1)
        K1 = torch.ones_like(W1, dtype=torch.bool)
        if not pattern.structured:
            score = W1.pow(2) / d.pow(2)[None, :]
            count = int(score.numel() * pattern.ratio)
            if count:
                lowest = score.flatten().topk(count, largest=False).indices
                K1.view(-1)[lowest] = False
        for j in range(i2 - i1):
            if pattern.structured and j % pattern.m == 0:
                group = W1[:, j:j + pattern.m].pow(2) / d[j:j + pattern.m].pow(2)[None, :]
                lowest = group.topk(pattern.n, dim=1, largest=False).indices
                K1[:, j:j + pattern.m].scatter_(1, lowest, False)
            w = W1[:, j]
            kept = torch.where(K1[:, j], w, torch.zeros_like(w))
            err = (w - kept) / d[j]
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]
            W1[:, j] = kept
            E1[:, j] = err
        W[:, i1:i2] = W1
        keep[:, i1:i2] = K1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return W * keep, keep
