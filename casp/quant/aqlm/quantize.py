"""AQLM (Egiazarian et al. 2024): additive quantization of a linear's weight.

Each group of ``in_group_size`` consecutive input weights of an output row is coded as the
sum of M codewords, one from each of M codebooks of 2^B vectors, times the row's scale:

    W_hat[o, g*ig:(g+1)*ig] = s_o * sum_m C_m[codes[o, g, m]]

The codes, codebooks and scales minimise the layer-output error tr((W - W_hat) H (W - W_hat)^T)
with H = 2 X X^T / n from calibration inputs:
1. scales: each row's RMS; codebooks: residual k-means on the scaled weight groups (codebook
   m clusters what codebooks 0..m-1 left over);
2. rounds of (a) Adam on codebooks and scales with the codes fixed (exact gradients of the
   quadratic objective, no autograd) and (b) a beam search over the codes with codebooks and
   scales fixed: one coordinate (group g, codebook m) at a time, for every row at once, the
   exact change of the objective for all 2^B candidate codewords (the H coupling between
   groups is carried in R = (W/s - X_hat) H and updated by a rank-``ig`` correction);
3. until a round improves the objective by less than ``tolerance`` (relative).

Rows are independent given the codebooks, so the beam search vectorises over rows (and row
chunks bound its memory). The beam keeps ``beam_size`` hypotheses per row; its first slot
always follows the greedy choice, so a beam search is never worse than the greedy one.

Only ``out_group_size`` 1 (one scale per output row) is implemented.
Storage follows the ``aqlm`` package's QuantizedLinear: codes [out, in/ig, M] as int8
(B <= 8) or int16 (B <= 16) in two's complement, codebooks [M, 2^B, 1, ig] and scales
[out, 1, 1, 1] in fp16.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from casp.errors import CaspError
from casp.quant.aqlm.setting import AQLMSetting

log = logging.getLogger("casp")

def to_storage_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Codes 0..2^B-1 -> the aqlm layout: int8/int16, values >= 2^(B-1) wrapped negative."""
    wrapped = torch.where(codes >= 2 ** (nbits - 1), codes - 2 ** nbits, codes)
    return wrapped.to(torch.int8 if nbits <= 8 else torch.int16)


def from_storage_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    return codes.to(torch.int64) % (2 ** nbits)


def decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Sum of codewords: codes [out, G, M] (0..K-1), codebooks [M, K, ig] -> [out, G*ig]."""
    out, groups, m = codes.shape
    offsets = torch.arange(m, device=codes.device) * codebooks.shape[1]
    flat = codebooks.reshape(-1, codebooks.shape[-1])
    return flat[codes + offsets].sum(2).reshape(out, -1)


def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W_hat = s * decode(codes): scales [out] (or [out, 1, 1, 1])."""
    return decode(codes, codebooks) * scales.reshape(-1, 1).to(codebooks.dtype)


# ----------------------------------------------------------------------------- k-means

def _nearest(points: torch.Tensor, centroids: torch.Tensor, chunk_bytes: int = 2 ** 28
             ) -> torch.Tensor:
    """Index of the nearest centroid of every point (squared Euclidean), in row chunks."""
    c_sq = (centroids * centroids).sum(1)
    rows = max(1, chunk_bytes // (4 * centroids.shape[0]))
    out = torch.empty(points.shape[0], dtype=torch.int64, device=points.device)
    for start in range(0, points.shape[0], rows):
        p = points[start:start + rows]
        out[start:start + rows] = (c_sq - 2 * p @ centroids.T).argmin(1)
    return out


KMEANS_PLUS_PLUS_MAX = 1024


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Seeds drawn one by one with probability proportional to the squared distance to the
    nearest seed so far (Arthur & Vassilvitskii 2007)."""
    first = int(torch.randint(points.shape[0], (1,), generator=generator))
    seeds = [points[first]]
    dist = ((points - seeds[0]) ** 2).sum(1)
    for _ in range(1, k):
        weights = dist.double().cpu()
        if float(weights.sum()) <= 0:
            index = int(torch.randint(points.shape[0], (1,), generator=generator))
        else:
            index = int(torch.multinomial(weights, 1, generator=generator))
        seeds.append(points[index])
        dist = torch.minimum(dist, ((points - seeds[-1]) ** 2).sum(1))
    return torch.stack(seeds).clone()


def kmeans(points: torch.Tensor, k: int, iterations: int, generator: torch.Generator,
           max_points_per_centroid: int | None = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means, fitted on at most ``max_points_per_centroid * k`` random points and
    started from k-means++ seeds (``k`` <= 1024) or ``k`` distinct random points (larger
    codebooks; with fewer points than ``k`` every point is a centroid and the rest are
    perturbed copies). Returns (centroids, assignment of every point); an emptied cluster is
    re-seeded at the point farthest from its centroid."""
    everything = points
    n = points.shape[0]
    perm = torch.randperm(n, generator=generator, device="cpu").to(points.device)
    if max_points_per_centroid and n > max_points_per_centroid * k:
        points = points[perm[:max_points_per_centroid * k]]
        n = points.shape[0]
        perm = torch.arange(n, device=points.device)
    if k <= KMEANS_PLUS_PLUS_MAX and n >= k:
        centroids = _kmeans_plus_plus(points, k, generator)
    elif n >= k:
        centroids = points[perm[:k]].clone()
    else:
        extra = points[perm[torch.arange(k - n) % n]]
        noise = torch.randn(extra.shape, generator=generator).to(points) * points.std() * 0.01
        centroids = torch.cat([points[perm], extra + noise])
    assign = _nearest(points, centroids)
    for _ in range(iterations):
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k).to(points.dtype)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
        if empty.any() and n >= k:
            dist = ((points - centroids[assign]) ** 2).sum(1)
            far = dist.topk(int(empty.sum())).indices
            centroids[empty] = points[far]
        new = _nearest(points, centroids)
        if torch.equal(new, assign):
            break
        assign = new
    if everything is not points:
        assign = _nearest(everything, centroids)
    return centroids, assign


def residual_kmeans_init(target: torch.Tensor, setting: AQLMSetting, iterations: int,
                         generator: torch.Generator, max_points_per_centroid: int | None = 256
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebooks [M, K, ig] and codes [out, G, M] for the (scaled) weight ``target``."""
    out, in_f = target.shape
    ig, m = setting.in_group_size, setting.num_codebooks
    residual = target.reshape(-1, ig).clone()
    books, codes = [], []
    for _ in range(m):
        centroids, assign = kmeans(residual, setting.codebook_size, iterations, generator,
                                   max_points_per_centroid)
        residual -= centroids[assign]
        books.append(centroids)
        codes.append(assign.view(out, in_f // ig))
    return torch.stack(books), torch.stack(codes, dim=-1)


# ----------------------------------------------------------------------------- objective

def objective(weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor,
              codebooks: torch.Tensor, scales: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T)."""
    err = weight - dequantize(codes, codebooks, scales)
    return float(((err @ hessian) * err).sum())


def _objective_and_grads(weight, hessian, codes, codebooks, scales):
    """The objective and its exact gradients with respect to codebooks and scales."""
    x_hat = decode(codes, codebooks)
    err = weight - scales[:, None] * x_hat
    err_h = err @ hessian
    loss = (err * err_h).sum()
    grad_w = -2 * err_h                                  # d loss / d W_hat
    grad_scales = (grad_w * x_hat).sum(1)
    grad_x = (grad_w * scales[:, None]).reshape(-1, codebooks.shape[-1])
    grad_books = torch.zeros_like(codebooks)
    for m in range(codebooks.shape[0]):
        grad_books[m].index_add_(0, codes[..., m].reshape(-1), grad_x)
    return loss, grad_books, grad_scales


def adam_update(weight, hessian, codes, codebooks, scales, steps: int, lr: float,
                betas=(0.0, 0.95)) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on codebooks and scales with the codes fixed."""
    params = [torch.nn.Parameter(codebooks.clone()), torch.nn.Parameter(scales.clone())]
    opt = torch.optim.Adam(params, lr=lr, betas=betas)
    for _ in range(steps):
        _, g_books, g_scales = _objective_and_grads(weight, hessian, codes, params[0].data,
                                                    params[1].data)
        params[0].grad, params[1].grad = g_books, g_scales
        opt.step()
    return params[0].data, params[1].data


# ----------------------------------------------------------------------------- beam search

def beam_search(target: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor,
                codebooks: torch.Tensor, beam_size: int = 1, chunk_bytes: int = 2 ** 28
                ) -> torch.Tensor:
    """One sweep over every (group, codebook) coordinate, improving the codes of ``target``
    (the weight divided by the row scales) under tr(D H D^T), D = target - decode(codes).
    Returns the new codes [out, G, M]; never worse than the input codes."""
    out, in_f = target.shape
    m, k, ig = codebooks.shape
    rows = max(1, chunk_bytes // (4 * beam_size * k * max(ig, 4)))
    result = torch.empty_like(codes)
    for start in range(0, out, rows):
        sl = slice(start, start + rows)
        result[sl] = _beam_search_rows(target[sl], hessian, codes[sl], codebooks, beam_size)
    return result


def _beam_search_rows(target, hessian, codes, codebooks, beam_size):
    out, in_f = target.shape
    m, k, ig = codebooks.shape
    groups = in_f // ig
    diff = target - decode(codes, codebooks)
    r = (diff @ hessian).unsqueeze(1)                   # [out, hyps, in]: D H per hypothesis
    loss = (diff * r[:, 0]).sum(1, keepdim=True)        # [out, hyps]
    hyp = codes.unsqueeze(1).clone()                    # [out, hyps, G, M]
    rows = torch.arange(out, device=target.device)[:, None]
    for g in range(groups):
        cols = slice(g * ig, (g + 1) * ig)
        h_gg, h_row = hessian[cols, cols], hessian[cols]
        for j in range(m):
            book = codebooks[j]                                       # [K, ig]
            quad = ((book @ h_gg) * book).sum(1)                      # b^T H b
            current = hyp[:, :, g, j]                                 # [out, hyps]
            a = book[current]                                         # [out, hyps, ig]
            t = r[:, :, cols] + a @ h_gg
            score = quad - 2 * t @ book.T                             # [out, hyps, K]
            own = score.gather(2, current.unsqueeze(2)).squeeze(2)
            total = loss.unsqueeze(2) + score - own.unsqueeze(2)      # exact new losses
            if beam_size == 1:
                parent = torch.zeros(out, 1, dtype=torch.int64, device=target.device)
                choice = total[:, 0].argmin(1, keepdim=True)
            else:
                flat = total.reshape(out, -1)
                anchor = total[:, 0].argmin(1, keepdim=True)          # greedy continuation
                width = min(beam_size, flat.shape[1])
                rest = flat.scatter(1, anchor, float("inf")).topk(width - 1, largest=False).indices
                picked = torch.cat([anchor, rest], 1)
                parent, choice = picked // k, picked % k
            new_loss = total.reshape(out, -1).gather(1, parent * k + choice)
            b = book[choice]                                          # [out, beam, ig]
            delta = a[rows, parent] - b                               # change of D on cols
            r = r[rows, parent] + delta @ h_row
            hyp = hyp[rows, parent].clone()
            hyp[:, :, g, j] = choice
            loss = new_loss
    best = loss.argmin(1)
    return hyp[torch.arange(out, device=target.device), best]


# ----------------------------------------------------------------------------- driver

@dataclass
class AQLMResult:
    codes: torch.Tensor            # [out, G, M] int64, 0..K-1
    codebooks: torch.Tensor        # [M, K, ig] float32 (fp16-representable)
    scales: torch.Tensor           # [out] float32 (fp16-representable)
    setting: AQLMSetting
    relative_error: float          # objective / tr(W H W^T)
    rounds: int
    history: list[float] = field(default_factory=list)


def aqlm_quantize(weight: torch.Tensor, hessian: torch.Tensor, setting: AQLMSetting,
                  beam_size: int = 1, max_rounds: int = 100, steps_per_round: int = 100,
                  lr: float = 1e-4, tolerance: float = 0.01, kmeans_iterations: int = 20,
                  kmeans_max_points: int | None = 256, seed: int = 0) -> AQLMResult:
    """Quantize ``weight`` [out, in] under H [in, in] (see the module docstring)."""
    out_f, in_f = weight.shape
    setting.check(out_f, in_f)
    if beam_size < 1:
        raise CaspError(f"beam size {beam_size} must be at least 1")
    w = weight.float()
    h = hessian.float().to(w.device)
    generator = torch.Generator().manual_seed(seed)
    scales = (w.pow(2).mean(1).sqrt()).clamp_min(1e-8)
    codebooks, codes = residual_kmeans_init(w / scales[:, None], setting, kmeans_iterations,
                                            generator, kmeans_max_points or None)
    reference = abs(float(((w @ h) * w).sum())) or 1.0
    history = [objective(w, h, codes, codebooks, scales) / reference]
    codes = beam_search(w / scales[:, None], h, codes, codebooks, beam_size)
    history.append(objective(w, h, codes, codebooks, scales) / reference)
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        codebooks, scales = adam_update(w, h, codes, codebooks, scales, steps_per_round, lr)
        codes = beam_search(w / scales[:, None], h, codes, codebooks, beam_size)
        history.append(objective(w, h, codes, codebooks, scales) / reference)
        prev, cur = history[-2], history[-1]
        if prev <= 0 or (prev - cur) / prev < tolerance:
            break
    # what is stored is fp16: round, then let the codes adapt to the rounded codebooks
    codebooks = codebooks.half().float()
    scales = scales.half().float()
    codes = beam_search(w / scales[:, None], h, codes, codebooks, beam_size)
    error = objective(w, h, codes, codebooks, scales) / reference
    history.append(error)
    return AQLMResult(codes, codebooks, scales, setting, error, rounds, history)
