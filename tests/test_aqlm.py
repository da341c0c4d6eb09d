"""AQLM written here: settings and their stored cost, k-means, the beam search, the whole
optimisation, and the module's agreement with the aqlm package's QuantizedLinear."""
import pytest
import torch

from casp.errors import CaspError
from casp.quant.aqlm.quantize import (AQLMSetting, aqlm_quantize, beam_search, decode, dequantize,
                             from_storage_codes, kmeans, objective, residual_kmeans_init,
                             to_storage_codes)
from casp.quant.aqlm.linear import AQLMLinear


def problem(out_f=32, in_f=64, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    mix = torch.eye(in_f) + 0.3 * torch.randn(in_f, in_f, generator=g)
    x = torch.randn(n, in_f, generator=g) @ mix
    return w, 2 * x.T @ x / n


def test_setting_parse_cost_and_bad_settings():
    s = AQLMSetting.parse("2x8")
    assert (s.num_codebooks, s.nbits, s.in_group_size, s.nominal_bits) == (2, 8, 8, 2.0)
    assert AQLMSetting.parse("1x16g16").in_group_size == 16
    # codes int8 (2 per group of 8), fp16 codebooks 2 x 256 x 8, one fp16 scale per row
    assert s.cost(4096, 4096) == 4096 * 512 * 2 * 8 + 2 * 256 * 8 * 16 + 4096 * 16
    # 12-bit codes live in int16: 2x12 stores 4 bits per weight of codes, not 3
    assert AQLMSetting.parse("2x12").cost(64, 64) == 64 * 8 * 2 * 16 + 2 * 4096 * 8 * 16 + 64 * 16
    for bad in ("2x17", "0x8", "2x", "x8", "9x8"):
        with pytest.raises(CaspError):
            AQLMSetting.parse(bad)
    with pytest.raises(CaspError, match="does not divide"):
        s.check(64, 36)


def test_storage_codes_round_trip_in_the_aqlm_convention():
    from aqlm.utils import pack_int_data, unpack_int_data

    for nbits in (4, 8, 12, 16):
        codes = torch.randint(0, 2 ** nbits, (5, 7, 2))
        stored = to_storage_codes(codes, nbits)
        assert stored.dtype == (torch.int8 if nbits <= 8 else torch.int16)
        assert torch.equal(stored, pack_int_data(codes.clone(), nbits))
        assert torch.equal(from_storage_codes(stored, nbits), codes)
        assert torch.equal(unpack_int_data(stored, nbits), codes)


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 4, generator=g) * 10
    points = centers.repeat_interleave(50, 0) + 0.01 * torch.randn(400, 4, generator=g)
    found, assign = kmeans(points, 8, 50, g)
    err = ((points - found[assign]) ** 2).sum(1).max()
    assert err < 0.01
    assert len(set(assign.tolist())) == 8


def test_residual_init_lowers_the_error_with_every_codebook():
    w, _ = problem()
    g = torch.Generator().manual_seed(0)
    errors = []
    for m in (1, 2, 3):
        books, codes = residual_kmeans_init(w, AQLMSetting(m, 6, 8), 10, g)
        errors.append(((w - decode(codes, books)) ** 2).sum().item())
    assert errors[0] > errors[1] > errors[2]


def test_beam_search_never_worse_than_greedy_nor_than_its_start():
    w, h = problem()
    s = w.pow(2).mean(1).sqrt()
    ones = torch.ones_like(s)
    for seed in range(3):
        books, codes = residual_kmeans_init(w / s[:, None], AQLMSetting(2, 5, 8), 5,
                                            torch.Generator().manual_seed(seed))
        start = objective(w / s[:, None], h, codes, books, ones)
        greedy = objective(w / s[:, None], h, beam_search(w / s[:, None], h, codes, books, 1),
                           books, ones)
        beams = [objective(w / s[:, None], h, beam_search(w / s[:, None], h, codes, books, b),
                           books, ones) for b in (2, 4, 8)]
        assert greedy < start
        for value in beams:
            assert value <= greedy * (1 + 1e-5)
        assert beams[-1] < greedy         # a wider beam finds something better here


def test_beam_search_chunks_rows_without_changing_the_result():
    w, h = problem()
    books, codes = residual_kmeans_init(w, AQLMSetting(2, 5, 8), 5, torch.Generator().manual_seed(1))
    whole = beam_search(w, h, codes, books, 3)
    chunked = beam_search(w, h, codes, books, 3, chunk_bytes=3 * 32 * 8 * 4 * 5)
    assert torch.equal(whole, chunked)


def test_error_shrinks_as_bits_grow_and_rounds_converge():
    w, h = problem()
    errors = []
    for setting in ("1x6", "2x6", "3x6", "4x6"):
        r = aqlm_quantize(w, h, AQLMSetting.parse(setting), max_rounds=6, steps_per_round=20,
                          lr=1e-3, kmeans_iterations=10)
        errors.append(r.relative_error)
        assert r.history[-2] <= r.history[1] + 1e-6        # rounds only improve
        assert r.relative_error == pytest.approx(
            objective(w, h, r.codes, r.codebooks, r.scales) / ((w @ h) * w).sum().item(), rel=1e-4)
        # stored values are fp16-exact
        assert torch.equal(r.codebooks, r.codebooks.half().float())
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.5 * errors[0]


def test_optimisation_beats_its_initialisation_and_uses_h():
    """The H-aware search must beat plain nearest-codeword rounding of the k-means init on
    the objective it minimises."""
    w, h = problem(seed=3)
    setting = AQLMSetting(2, 6, 8)
    r = aqlm_quantize(w, h, setting, max_rounds=5, steps_per_round=20, lr=1e-3,
                      kmeans_iterations=10)
    assert r.history[-1] < 0.8 * r.history[0]


def test_aqlm_linear_matches_the_aqlm_package_on_the_same_tensors():
    from aqlm import QuantizedLinear

    from casp.quant.aqlm.linear import serial_numba

    w, h = problem(48, 64)
    for name in ("2x8", "1x8", "2x12", "1x16", "2x6g4"):
        setting = AQLMSetting.parse(name)
        r = aqlm_quantize(w, h, setting, max_rounds=1, steps_per_round=5, kmeans_iterations=3)
        bias = torch.randn(48)
        module = AQLMLinear.from_result(r, bias, torch.float32)
        reference = module.dequantized_weight()
        assert torch.allclose(reference, dequantize(r.codes, r.codebooks, r.scales), atol=1e-6)
        x = torch.randn(3, 5, 64)
        expected = torch.nn.functional.linear(x, reference, bias)
        ours = module(x)                     # through the aqlm kernels
        assert torch.allclose(ours, expected, atol=1e-4), name
        theirs = QuantizedLinear(64, 48, setting.in_group_size, 1, setting.num_codebooks,
                                 setting.nbits, bias=True)
        theirs.load_state_dict({k: v.float() if v.is_floating_point() else v
                                for k, v in module.state_dict().items()})
        with serial_numba(setting.nbits == 8):
            assert torch.allclose(theirs(x), expected, atol=1e-4), name
            assert torch.allclose(theirs(x[:1, :1]), expected[:1, :1], atol=1e-4), name
        # codes are stored untouched by the kernel's own re-layout
        assert torch.equal(from_storage_codes(module.codes, setting.nbits), r.codes)
        assert module.storage_bits() == setting.cost(48, 64)


def test_aqlm_linear_keeps_fp16_storage_through_dtype_moves():
    w, h = problem(16, 32)
    r = aqlm_quantize(w, h, AQLMSetting.parse("1x6"), max_rounds=1, steps_per_round=2)
    module = AQLMLinear.from_result(r, None, torch.float32)
    before = module.dequantized_weight()
    module.to(torch.bfloat16)
    assert module.codebooks.dtype == torch.float16 and module.scales.dtype == torch.float16
    assert torch.equal(module.dequantized_weight(), before)
    y = module(torch.randn(2, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
