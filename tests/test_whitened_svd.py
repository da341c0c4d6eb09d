"""Stage 1 math against brute force on small matrices."""
import pytest
import torch

from casp.lowrank import (LowRankLinear, plain_svd, rank_for_compression, saves_parameters,
                          whitened_svd, whitening_factor)


def correlated_inputs(dim: int, tokens: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    scales = torch.logspace(0, -2, dim, dtype=torch.float64)
    return (mix * scales) @ torch.randn(dim, tokens, generator=gen, dtype=torch.float64)


def output_error(w, w_approx, x):
    return torch.linalg.norm((w - w_approx) @ x).item()


def optimum(w, x, rank):
    """min over rank-r W' of ||(W - W') X||_F: the tail singular values of W X."""
    s = torch.linalg.svdvals(w @ x)
    return s[rank:].pow(2).sum().sqrt().item()


@pytest.mark.parametrize("out_f,in_f", [(24, 16), (8, 16), (16, 16)])  # 8 x 16: GQA-like k_proj
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whitened_error_is_the_optimum_and_beats_plain(out_f, in_f, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    w = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    x = correlated_inputs(in_f, 400, seed)
    gram = x @ x.T
    for rank in range(1, min(out_f, in_f)):
        up, down = whitened_svd(w, gram, rank)
        assert up.shape == (out_f, rank) and down.shape == (rank, in_f)
        err_white = output_error(w, up @ down, x)
        best = optimum(w, x, rank)
        assert err_white == pytest.approx(best, rel=1e-6, abs=1e-9)
        pu, pd = plain_svd(w, rank)
        assert err_white <= output_error(w, pu @ pd, x) + 1e-9


def test_whitening_beats_plain_by_a_margin_on_anisotropic_inputs():
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(32, 32, generator=gen, dtype=torch.float64)
    x = correlated_inputs(32, 1000, 7)
    up, down = whitened_svd(w, x @ x.T, 8)
    pu, pd = plain_svd(w, 8)
    assert output_error(w, up @ down, x) < 0.5 * output_error(w, pu @ pd, x)


def test_factors_are_balanced():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(20, 12, generator=gen, dtype=torch.float64)
    x = correlated_inputs(12, 200, 3)
    s = whitening_factor(x @ x.T)
    up, down = whitened_svd(w, x @ x.T, 5)
    # up = U sqrt(Sigma) and down S = sqrt(Sigma) V^T: both sides carry the same norms
    col_norms = up.norm(dim=0)
    row_norms = (down @ s).norm(dim=1)
    assert torch.allclose(col_norms, row_norms, rtol=1e-8)
    assert torch.all(col_norms[:-1] >= col_norms[1:])


def test_singular_gram_falls_back_and_stays_near_optimal():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(10, 16, generator=gen, dtype=torch.float64)
    x = torch.randn(16, 6, generator=gen, dtype=torch.float64)   # 6 tokens < 16 dims
    gram = x @ x.T
    assert torch.linalg.cholesky_ex(gram)[1] != 0    # plain Cholesky fails
    up, down = whitened_svd(w, gram, 4)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    scale = torch.linalg.norm(w @ x).item()
    assert output_error(w, up @ down, x) <= optimum(w, x, 4) + 1e-4 * scale


def test_float32_inputs_are_computed_in_float64():
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(16, 16, generator=gen)
    x = correlated_inputs(16, 300, 9)
    up, down = whitened_svd(w, (x @ x.T).float(), 6)
    assert up.dtype == torch.float64
    assert output_error(w.double(), up @ down, x) == pytest.approx(optimum(w.double(), x, 6),
                                                                   rel=1e-4)


@pytest.mark.parametrize("out_f,in_f,compression,expected", [
    (4096, 4096, 0.75, 512), (5120, 5120, 0.75, 640), (576, 576, 0.75, 72),
    (192, 576, 0.75, 36), (1024, 4096, 0.75, 204), (576, 576, 0.5, 144),
    (5120, 5120, 0.8, 512), (5120, 5120, 0.9, 256), (640, 640, 0.8, 64)])   # exact, no float loss
def test_rank_formula(out_f, in_f, compression, expected):
    r = rank_for_compression(out_f, in_f, compression)
    assert r == expected
    assert saves_parameters(out_f, in_f, r)
    assert r * (out_f + in_f) <= (1 - compression) * out_f * in_f + 1e-6


def test_lowrank_linear_matches_dense_product():
    gen = torch.Generator().manual_seed(1)
    up, down = torch.randn(12, 3, generator=gen), torch.randn(3, 8, generator=gen)
    bias = torch.randn(12, generator=gen)
    module = LowRankLinear.from_factors(up, down, bias, torch.float32)
    x = torch.randn(5, 8, generator=gen)
    assert torch.allclose(module(x), x @ (up @ down).T + bias, atol=1e-5)
    assert module.describe() == {"type": "lowrank", "in_features": 8, "out_features": 12,
                                 "rank": 3, "bias": True}


def test_truncation_error_is_the_measured_relative_output_error():
    from casp.lowrank import truncation_error, whitened_factors

    gen = torch.Generator().manual_seed(11)
    w = torch.randn(24, 16, generator=gen, dtype=torch.float64)
    x = correlated_inputs(16, 300, 11)
    up, down, spectrum = whitened_factors(w, x @ x.T / 300, 5)
    measured = output_error(w, up @ down, x) / torch.linalg.norm(w @ x).item()
    assert truncation_error(spectrum, 5) == pytest.approx(measured, rel=1e-6)
    assert truncation_error(spectrum, 16) == pytest.approx(0, abs=1e-12)
