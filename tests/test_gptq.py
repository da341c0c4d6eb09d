"""GPTQ on small random matrices: never worse than round-to-nearest in the H-weighted
error, close to the weights at 8 bits, groups respected with act-order, the module that runs
from the packed form equal to the algorithm's result."""
import math

import pytest
import torch

from casp.errors import CaspError
from casp.quant.gptq.quantize import (dequantize, gptq_quantize, minmax_grid, rtn_quantize,
                             stored_bits, weighted_error)
from casp.quant.gptq.linear import GPTQLinear


def problem(out_f=48, in_f=96, tokens=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) / math.sqrt(in_f)
    x = torch.randn(tokens, in_f, generator=g) @ mix       # correlated inputs
    x[:, 3] *= 8                                            # an outlier channel
    h = 2 * x.T @ x / tokens
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    return w, h


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_gptq_error_at_most_round_to_nearest(bits, group_size, act_order, static):
    w, h = problem(seed=bits)
    r = gptq_quantize(w, h, bits, group_size, act_order=act_order, static_groups=static,
                      damp=0.01)
    gptq_err = weighted_error(w, r.dequantize(), h.double())
    rtn_err = weighted_error(w, rtn_quantize(w, bits, group_size), h.double())
    assert gptq_err <= rtn_err
    assert gptq_err < 0.9 * rtn_err      # and clearly better on correlated inputs


def test_eight_bits_reproduce_the_weights():
    w, h = problem()
    r = gptq_quantize(w, h, 8, 32)
    rel = ((r.dequantize() - w).norm() / w.norm()).item()
    assert rel < 0.01
    assert weighted_error(w, r.dequantize(), h.double()) < 0.005


def test_codes_lie_on_their_group_grid_with_act_order():
    w, h = problem(in_f=96)
    r = gptq_quantize(w, h, 3, 32, act_order=True, static_groups=False)
    assert r.g_idx is not None
    # every group holds exactly group_size columns, and they are not the consecutive ones
    counts = torch.bincount(r.g_idx, minlength=3)
    assert counts.tolist() == [32, 32, 32]
    assert not torch.equal(r.g_idx, torch.arange(96) // 32)
    # codes are 3-bit integers; dequantizing with the group of each column gives back
    # exactly scale * (code - zero) of that group
    assert int(r.codes.max()) <= 7
    deq = r.dequantize()
    for col in (0, 17, 95):
        k = int(r.g_idx[col])
        expected = r.scales[:, k] * (r.codes[:, col].float() - r.zeros[:, k])
        assert torch.allclose(deq[:, col], expected)
    # the group's columns are the processing order's consecutive positions: the first
    # group holds the 32 columns with the largest Hessian diagonal
    top = set(torch.argsort(h.diagonal(), descending=True)[:32].tolist())
    assert set(torch.nonzero(r.g_idx == 0).flatten().tolist()) == top


def test_static_groups_keep_consecutive_groups():
    w, h = problem()
    r = gptq_quantize(w, h, 2, 32, act_order=True, static_groups=True)
    assert r.g_idx is None
    # the grid of each group is the min-max grid of the original weights
    scale, zero = minmax_grid(w[:, 32:64], 2)
    assert torch.allclose(r.scales[:, 1], scale) and torch.equal(r.zeros[:, 1], zero)


def test_shorter_last_group_and_dead_inputs():
    w, h = problem(in_f=80)
    h[5, :] = 0
    h[:, 5] = 0                      # an input that is always zero
    r = gptq_quantize(w, h, 4, 32, act_order=False)
    assert r.scales.shape == (48, 3)  # 32 + 32 + 16 columns
    assert torch.all(r.dequantize()[:, 5] == r.scales[:, 0] * (r.codes[:, 5] - r.zeros[:, 0]))


def test_stored_bits_counts_codes_scales_zeros_and_group_indices():
    assert stored_bits(4096, 4096, 2, 128) / (4096 * 4096) == 2.25
    assert stored_bits(10, 576, 2, 128) == 10 * 576 * 2 + 10 * 5 * 32     # 5 groups, last short
    assert stored_bits(10, 64, 3, -1) == 10 * 64 * 3 + 10 * 32
    assert stored_bits(10, 64, 3, 32, g_idx=True) == 10 * 64 * 3 + 10 * 2 * 32 + 64 * 16


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_module_runs_from_the_packed_form(bits, act_order):
    w, h = problem(out_f=24, in_f=96, seed=bits)
    r = gptq_quantize(w, h, bits, 32, act_order=act_order)
    bias = torch.randn(24)
    m = GPTQLinear.from_result(r, bits, bias, torch.float32)
    assert torch.equal(m.dequantized_weight(), r.dequantize())
    x = torch.randn(5, 96)
    assert torch.allclose(m(x), x @ r.dequantize().T + bias, atol=1e-5)
    stored = sum(t.numel() * t.element_size() for n, t in m.state_dict().items() if n != "bias")
    assert stored * 8 == pytest.approx(m.storage_bits(), abs=8)
    rebuilt = GPTQLinear.from_description(m.describe())
    rebuilt.load_state_dict(m.state_dict())
    assert torch.equal(rebuilt(x), m(x))
    # converting the model's dtype does not change what is stored
    m.to(torch.float64)
    assert m.scales.dtype == torch.float16 and m(x.double()).dtype == torch.float64


def test_bits_outside_two_to_eight_are_refused():
    w, h = problem()
    with pytest.raises(CaspError, match="2 to 8"):
        gptq_quantize(w, h, 1, 32)
    with pytest.raises(CaspError, match="group size"):
        gptq_quantize(w, h, 2, 0)


def test_dequantize_uses_the_group_index():
    codes = torch.tensor([[0, 1, 2, 3]], dtype=torch.uint8)
    scales = torch.tensor([[1.0, 10.0]])
    zeros = torch.tensor([[0.0, 1.0]])
    g_idx = torch.tensor([1, 0, 1, 0])
    assert dequantize(codes, scales, zeros, 2, g_idx).tolist() == [[-10.0, 1.0, 10.0, 3.0]]
    assert dequantize(codes, scales, zeros, 2).tolist() == [[0.0, 1.0, 10.0, 20.0]]
