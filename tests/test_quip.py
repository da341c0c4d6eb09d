"""QuIP# pieces: Hadamard / orthogonal transforms, the E8P12 and E81B codebooks, BlockLDLQ,
incoherence, packing and the QuIP# linear."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from casp.errors import CaspError
from casp.quant.quip import hadamard as hd
from casp.quant.quip.codebooks import abs_patterns, decode_e8p, e81b_table, e8p_table, nearest_e8p, nearest_in
from casp.quant.quip.setting import SETTINGS, QuIPSetting
from casp.quant.quip.quantize import (block_ldl, block_ldlq, proxy_loss, quip_quantize, regularize,
                             rotate_hessian, rotate_weight, unrotate_weight)
from casp.quant.quip.linear import QuIPLinear, described_bits, to_int16

MODEL_DIMS = {576: (36, 4), 192: (12, 4), 1536: (12, 7), 4096: (1, 12), 11008: (344, 5),
              5120: (20, 8), 13824: (108, 7), 72: (36, 1), 40: (20, 1), 512: (1, 9),
              640: (20, 5), 32: (1, 5)}


@pytest.mark.parametrize("n, expected", sorted(MODEL_DIMS.items()))
def test_model_dimensions_get_a_hadamard_of_known_order(n, expected):
    d = hd.decompose(n)
    assert (d.base_order, d.log2_pow) == expected
    assert d.kind == ("walsh" if expected[0] == 1 else "hadamard")


def test_paley_orders_are_hadamard_and_cover_the_known_small_orders():
    orders = [k for k in range(4, 400, 4) if hd.hadamard_matrix(k) is not None]
    # 12..108 and 172's neighbourhood: what Paley I/II over prime powers reach below 120
    assert {12, 20, 28, 36, 44, 52, 60, 68, 72, 76, 80, 84, 100, 104, 108} <= set(orders)
    for k in orders + [344]:
        h = hd.hadamard_matrix(k)
        assert set(np.unique(h)) == {-1, 1}
        assert np.array_equal(h @ h.T, k * np.eye(k, dtype=np.int64))
        # and the fast transform of that dimension is its orthogonal matrix
        m = hd.transform_matrix(k)
        x = torch.randn(2, k, dtype=torch.float64)
        assert torch.allclose(m @ m.T, torch.eye(k, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(hd.transform(x), x @ m.T, atol=1e-10)
    assert hd.hadamard_matrix(172) is None          # not a Paley order: 11008 uses 344 * 32


def test_finite_field_characters():
    # GF(9), GF(27), GF(25), GF(343): exactly (q - 1) / 2 nonzero squares, chi multiplicative
    for q in (9, 25, 27, 49, 343):
        _, chi = hd.quadratic_character(q)
        assert (chi == 1).sum() == (q - 1) // 2 and (chi == -1).sum() == (q - 1) // 2
    assert hd.prime_power(343) == (7, 3) and hd.prime_power(171) is None


@pytest.mark.parametrize("n", sorted(set(MODEL_DIMS) - {11008, 13824, 5120, 4096})
                         + [6, 10, 24, 28, 44, 52, 88, 100, 344, 688, 9, 30])
def test_fast_transform_matches_the_explicit_orthogonal_matrix(n):
    m = hd.transform_matrix(n)
    assert torch.allclose(m @ m.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(hd.transform(x), x @ m.T, atol=1e-10)
    assert torch.allclose(hd.transform(x, transpose=True), x @ m, atol=1e-10)
    assert torch.allclose(hd.transform(hd.transform(x), transpose=True), x, atol=1e-10)


@pytest.mark.parametrize("n", [11008, 13824, 5120, 4096])
def test_large_model_dimensions_are_orthogonal(n):
    x = torch.randn(4, n, dtype=torch.float64)
    y = hd.transform(x)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-10)
    assert torch.allclose(hd.transform(y, transpose=True), x, atol=1e-10)
    # linear and matching the explicit matrix on a few basis vectors
    d = hd.decompose(n)
    base = hd.base_matrix(n)
    pw = 1 << d.log2_pow
    walsh = torch.from_numpy(scipy.linalg.hadamard(pw)).double() / math.sqrt(pw)
    for i in (0, 1, n - 1, n // 3):
        e = torch.zeros(n, dtype=torch.float64)
        e[i] = 1
        column = torch.kron(base[:, i // pw], walsh[:, i % pw])
        assert torch.allclose(hd.transform(e), column, atol=1e-12)


def test_walsh_hadamard_is_sylvester_order():
    for n in (1, 2, 8, 64, 1024):
        x = torch.randn(7, n, dtype=torch.float64)
        h = torch.from_numpy(scipy.linalg.hadamard(n)).double()
        assert torch.allclose(hd.fwht(x), x @ h.T, atol=1e-9)
    with pytest.raises(ValueError):
        hd.fwht(torch.randn(3, 12))


@pytest.mark.skipif(not torch.cuda.is_available() or hd._fast_kernel() is None,
                    reason="needs CUDA and the fast-hadamard-transform package")
def test_cuda_kernel_agrees_with_the_torch_transform():                # pragma: no cover
    for n in (64, 576, 1536, 4096, 11008):
        x = torch.randn(16, n, device="cuda")
        kernel = hd.transform(x, use_kernel=True)
        torch_ = hd.transform(x, use_kernel=False)
        assert torch.allclose(kernel, torch_, atol=1e-4)
        # float64 (the Hessians' rotation) goes to the torch butterfly, not the kernel
        x64 = x.double()
        assert torch.allclose(hd.transform(x64), hd.transform(x64, use_kernel=False))


def test_sign_packing_round_trips():
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 8, 9, 576, 1000):
        s = hd.random_signs(n, g)
        packed = hd.pack_signs(s)
        assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
        assert torch.equal(hd.unpack_signs(packed, n), s)


def test_code_packing_round_trips():
    codes = torch.arange(1 << 16)
    stored = to_int16(codes)
    assert stored.dtype == torch.int16
    assert torch.equal(stored.long() & 0xFFFF, codes)
    assert torch.equal(decode_e8p(stored), decode_e8p(codes))


# ----------------------------------------------------------------------------- codebooks

def test_e8p12_has_65536_distinct_codewords_of_e8_plus_a_quarter():
    table = e8p_table()
    assert table.shape == (1 << 16, 8)
    assert len(torch.unique(table, dim=0)) == 1 << 16
    e = table - 0.25                                     # must lie in E8 = D8 ∪ (D8 + 1/2)
    integer = torch.all(e == e.round(), dim=1)
    half = torch.all(e - 0.5 == (e - 0.5).round(), dim=1)
    assert torch.all(integer | half)
    assert torch.all(e.sum(dim=1).round() % 2 == 0)
    pats = abs_patterns()
    assert pats.shape == (256, 8) and len(torch.unique(pats, dim=0)) == 256
    norms = (pats ** 2).sum(1)
    assert (norms <= 10).sum() == 227 and (norms == 12).sum() == 29


def test_e81b_has_256_distinct_points_of_e8():
    t = e81b_table()
    assert len(torch.unique(t, dim=0)) == 256
    integer = torch.all(t == t.round(), dim=1)
    half = torch.all(t - 0.5 == (t - 0.5).round(), dim=1)
    assert torch.all(integer | half) and torch.all(t.sum(1).round() % 2 == 0)
    norms = (t ** 2).sum(1)
    assert (norms == 0).sum() == 1 and (norms == 2).sum() == 240 and (norms == 4).sum() == 15


@pytest.mark.parametrize("spread", [0.3, 1.0, 3.0])
def test_fast_nearest_e8p12_equals_brute_force(spread):
    g = torch.Generator().manual_seed(int(spread * 10))
    x = torch.randn(2000, 8, generator=g) * spread
    values, codes = nearest_e8p(x, chunk=333)
    table = e8p_table()
    dist = ((x[:, None, :] - table[None]) ** 2).sum(-1)
    best, best_code = dist.min(dim=1)
    assert torch.allclose(((x - values) ** 2).sum(1), best, atol=1e-5)
    assert (codes == best_code).float().mean() > 0.999             # ties aside
    assert torch.equal(decode_e8p(codes), values)


def test_numba_and_torch_nearest_e8p12_give_the_same_codes(monkeypatch):
    """The CPU kernel (casp.kernels.e8p_nearest) and the torch search (CUDA, CASP_KERNELS=0)
    are the same search: the same codes, ties included, at every scale of input."""
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(3000, 8, generator=g) * s for s in (0.2, 1.0, 4.0)])
    x[:50] = torch.round(x[:50] * 4) / 4          # on the lattice's grid: many exact ties
    values, codes = nearest_e8p(x)
    monkeypatch.setenv("CASP_KERNELS", "0")
    ref_values, ref_codes = nearest_e8p(x, chunk=1000)
    assert torch.equal(codes, ref_codes) and torch.equal(values, ref_values)


def test_brute_force_search_of_e81b():
    x = torch.randn(500, 8)
    values, idx = nearest_in(x, e81b_table(), chunk=77)
    dist = ((x[:, None] - e81b_table()[None]) ** 2).sum(-1)
    assert torch.equal(idx, dist.argmin(1)) and torch.equal(values, e81b_table()[idx])


@pytest.mark.parametrize("name", ["e8p12", "e8p12rvq3b"])
def test_codebook_scales_are_optimal_for_gaussian_input(name):
    from dataclasses import replace

    s = SETTINGS[name]
    x = torch.randn(20000, 8, generator=torch.Generator().manual_seed(1))

    def mse(setting):
        v, _ = setting.round(x * setting.scale)
        return float(((v / setting.scale - x) ** 2).mean())

    best = mse(s)
    for factor in (0.9, 1.1):
        assert best < mse(replace(s, scale=s.scale * factor))
        if len(s.stages) > 1:
            assert best < mse(replace(s, resid_scale=s.resid_scale * factor))
    # more bits, less error: E8P12 (2 bits) beats 2-bit scalar Lloyd-Max (0.1175)
    assert best < {"e8p12": 0.1175, "e8p12rvq3b": 0.0345}[name]


def test_settings_parse_cost_and_refuse():
    s = QuIPSetting.parse("E8P12")
    assert s.bits == 2 and SETTINGS["e8p12rvq3b"].bits == 3 and SETTINGS["e8p12rvq4b"].bits == 4
    assert s.cost(576, 1536) == 576 * 1536 * 2 + 576 + 1536 + 32
    assert s.cost(20, 64) == 20 * 64 * 2 + 64 + 24 + 32            # signs in whole bytes
    with pytest.raises(CaspError, match="unknown"):
        QuIPSetting.parse("e8p11")
    with pytest.raises(CaspError, match="rank-multiple 8"):
        s.check(64, 36)


# ----------------------------------------------------------------------------- algorithm

def correlated_hessian(n, seed=0, outliers=4):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g) * 0.3 + torch.eye(n)
    x = torch.randn(2048, n, generator=g) @ a
    x[:, :outliers] *= 10
    return (x.T @ x / 2048).double()


def test_block_ldl_reconstructs_the_hessian():
    h = regularize(correlated_hessian(96), 0.01)
    l, d = block_ldl(h)
    assert torch.allclose(l @ torch.block_diag(*d) @ l.T, h, atol=1e-9)
    assert torch.equal(torch.triu(l, 1), torch.zeros_like(l))
    assert torch.equal(l[8:16, 8:16], torch.eye(8, dtype=l.dtype))


@pytest.mark.parametrize("name", list(SETTINGS))
def test_block_ldlq_beats_rounding_each_block_alone(name):
    s = SETTINGS[name]
    n = 128
    g = torch.Generator().manual_seed(5)
    signs = hd.random_signs(n, g).double()
    h = rotate_hessian(regularize(correlated_hessian(n, 3), 0.01), signs)
    w = torch.randn(64, n, generator=g) * s.scale
    q, codes = block_ldlq(w, h, s.round)
    direct = s.round(w.reshape(-1, 8))[0].reshape(w.shape)
    assert proxy_loss(w - q, h) < 0.7 * proxy_loss(w - direct, h)
    # the loss is exactly sum_j r_j D_j r_j^T of the blocks' rounding residuals
    l, d = block_ldl(h)
    r = (w - q).double() @ l
    theory = sum(float(((r[:, j:j + 8] @ d[j // 8]) * r[:, j:j + 8]).sum())
                 for j in range(0, n, 8))
    assert proxy_loss(w - q, h) == pytest.approx(theory, rel=1e-6)
    assert torch.equal(s.decode(codes).reshape(w.shape), q)
    # with a diagonal Hessian there is no feedback: BlockLDLQ is plain rounding
    q_diag, _ = block_ldlq(w, torch.diag(torch.rand(n, dtype=torch.float64) + 0.5), s.round)
    assert torch.equal(q_diag, direct)


def test_incoherence_lowers_the_peak_to_rms_ratio():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(192, 576, generator=g) * 0.02
    w[3, 7] = 2.0
    w[:, 11] *= 30
    s_in, s_out = hd.random_signs(576, g), hd.random_signs(192, g)
    wr = rotate_weight(w, s_in, s_out)

    def ratio(m):
        return float(m.abs().max() / m.pow(2).mean().sqrt())

    assert ratio(w) > 50 and ratio(wr) < 8
    assert torch.allclose(unrotate_weight(wr, s_in, s_out), w, atol=1e-6)
    h = correlated_hessian(576)
    hr = rotate_hessian(h, s_in.double())
    assert torch.allclose(hr, hr.T) and torch.linalg.eigvalsh(hr).min() > 0
    # the proxy loss is invariant under the rotations
    dw = torch.randn(192, 576, generator=g)
    assert proxy_loss(rotate_weight(dw, s_in, s_out), hr) == pytest.approx(proxy_loss(dw, h),
                                                                           rel=1e-5)


def test_quip_error_falls_with_bits_and_the_module_reproduces_it():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(96, 192, generator=g) * 0.05
    h = correlated_hessian(192, 1)
    errors = []
    for name in ("e8p12", "e8p12rvq3b", "e8p12rvq4b"):
        result = quip_quantize(w, h, SETTINGS[name], seed=4)
        errors.append(result.relative_error)
        bias = torch.randn(96)
        module = QuIPLinear.from_result(result, bias, torch.float32)
        assert torch.allclose(module.dequantized_weight(), result.weight, atol=1e-6)
        x = torch.randn(3, 10, 192)
        packed = module(x)
        assert torch.allclose(packed, x @ result.weight.T + bias, atol=1e-4)
        # state dict round trip through a module rebuilt from its description
        rebuilt = QuIPLinear.from_description(module.describe())
        rebuilt.load_state_dict(module.state_dict())
        assert torch.equal(rebuilt(x), packed)
        bits = sum(t.numel() * t.element_size() * 8 for k, t in module.state_dict().items()
                   if k != "bias")
        assert bits == described_bits(module.describe())
    assert errors[0] > 2 * errors[1] > 4 * errors[2] > 0
    assert errors[0] < 0.1


def test_dtype_moves_keep_the_stored_scale():
    result = quip_quantize(torch.randn(16, 64), torch.eye(64), SETTINGS["e8p12"])
    module = QuIPLinear.from_result(result, None, torch.float32)
    before = module.scale.clone()
    module.to(torch.bfloat16)
    assert module.scale.dtype == torch.float32 and torch.equal(module.scale, before)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert module(x).dtype == torch.bfloat16
