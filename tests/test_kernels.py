"""casp's CPU kernels (casp.kernels) against the dequantized reference, on random codes:
every GPTQ width with and without act-order groups, every QuIP# codebook, the AQLM settings
of the table and the direct kernel, at the shapes the models here have (576, 192, 1536,
4096, 11008 and low-rank ranks 72 and 136), for 1, 3 (fused kernel) and 17 tokens (tiles
through the BLAS GEMM), and the same bits on one and two threads."""
import subprocess
import sys

import numba
import pytest
import torch

from casp.kernels.packed_matmul import FUSED_MAX_TOKENS, reference_path
from casp.quant.random_codes import random_aqlm, random_gptq, random_quip

# (out, in): attention and MLP projections of SmolLM2 / the mini LLaVA, low-rank factors,
# and the 7B models' long input rows / tall output columns
SHAPES = [(192, 576), (1536, 576), (576, 1536), (72, 576), (576, 72), (136, 576), (576, 136),
          (16, 4096), (8, 11008), (4096, 16)]
TOKENS = (1, 3, 17)
assert TOKENS[1] <= FUSED_MAX_TOKENS < TOKENS[2]


def check_against_reference(module, tokens=TOKENS, seed=1):
    """The kernels' output equals the dequantized weight's matmul within float32 rounding:
    |error| <= 1e-5 of the largest output (sums of up to 11008 products, reordered)."""
    assert module.kernel_layout() is not None, "this module should have run a kernel"
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in tokens:
            x = torch.randn(n, module.in_features, generator=g)
            with reference_path():
                expected = module(x)
            got = module(x)
            scale = expected.abs().max().item()
            err = (got - expected).abs().max().item()
            assert err <= 1e-5 * scale, (n, err, scale)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_gptq_kernel_every_width(bits):
    for out_f, in_f in SHAPES[:4]:
        check_against_reference(random_gptq(out_f, in_f, bits, seed=bits))


@pytest.mark.parametrize("shape", SHAPES)
def test_gptq_kernel_shapes_with_act_order_groups(shape):
    out_f, in_f = shape
    check_against_reference(random_gptq(out_f, in_f, 2, act_order=True))
    check_against_reference(random_gptq(out_f, in_f, 3, group_size=64, act_order=True))


def test_gptq_kernel_lays_out_the_stored_codes_exactly():
    """Each bit plane holds its bits of the code where the kernel reads them: decoding the
    tile path's rows gives back codes - zeros times scales for every entry."""
    m = random_gptq(40, 192, 5, group_size=64, act_order=True)
    with reference_path():
        w = m.dequantized_weight()
    layout = m.kernel_layout()
    from casp.kernels.gptq_cpu import gptq_dequantize_rows

    out = torch.empty(m.out_features, m.in_features)
    gptq_dequantize_rows(layout.packed, layout.widths, layout.shifts, layout.offsets,
                         layout.starts, layout.scales, layout.zeros, 0, out.numpy())
    assert torch.allclose(out, w[:, layout.columns], atol=1e-6)
    assert layout.packed.nbytes == 48 * 192 * 5 // 8          # rows padded to 16, 5 bits each


def test_gptq_without_a_kernel_shape_runs_the_dequantized_matmul():
    m = random_gptq(24, 60, 2, group_size=20)        # groups of 20: not a multiple of 8
    assert m.kernel_layout() is None
    x = torch.randn(2, 60)
    assert torch.allclose(m(x), x @ m.dequantized_weight().T, atol=1e-5)


@pytest.mark.parametrize("codebook", ["e8p12", "e8p12rvq3b", "e8p12rvq4b"])
def test_quip_kernel_every_codebook(codebook):
    for out_f, in_f in SHAPES:
        check_against_reference(random_quip(out_f, in_f, codebook, bias=True))


@pytest.mark.parametrize("setting", [(2, 8, 8), (3, 8, 8), (1, 8, 8), (2, 6, 4), (1, 16, 8),
                                     (2, 12, 8)])
def test_aqlm_kernel_table_and_direct(setting):
    books, nbits, group = setting
    shapes = SHAPES if nbits <= 8 else SHAPES[:4]
    for out_f, in_f in shapes:
        check_against_reference(random_aqlm(out_f, in_f, books, nbits, group, bias=True))


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two CPU cores")
def test_kernels_give_the_same_bits_on_one_and_two_threads():
    """Every output is summed by one thread in a fixed order (the aqlm package's numba
    kernel races here: its outputs change with the thread count)."""
    modules = [random_gptq(1536, 576, 3, act_order=True), random_aqlm(576, 1536, 2, 8),
               random_aqlm(192, 576, 1, 16), random_quip(576, 1536, "e8p12rvq4b"),
               random_quip(1536, 576, "e8p12rvq3b")]
    before = torch.get_num_threads()
    x = torch.randn(FUSED_MAX_TOKENS, 1536)
    try:
        outputs = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                outputs[threads] = [m(x[:3, :m.in_features]) for m in modules]
        for a, b in zip(outputs[1], outputs[2]):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(before)


def test_numba_start_leaves_torchs_thread_count_alone():
    """numba's OpenMP layer resets the shared OpenMP thread count when it starts; the
    kernels put torch's back."""
    code = ("import torch; torch.set_num_threads(1)\n"
            "from casp.kernels.cpu_threads import sync_numba_threads\n"
            "import numba\n"
            "assert sync_numba_threads() == 1 and numba.get_num_threads() == 1\n"
            "print(torch.get_num_threads())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"


def test_layout_follows_changes_to_the_stored_tensors():
    m = random_gptq(64, 128, 2)
    x = torch.randn(1, 128)
    before = m(x)
    with torch.no_grad():
        m.scales.mul_(2)                       # in place: the layout is rebuilt
    assert torch.allclose(m(x), 2 * before, rtol=1e-5, atol=1e-6)


def test_inputs_that_need_gradients_take_the_differentiable_path():
    m = random_quip(72, 576, "e8p12")
    m.begin_training()
    x = torch.randn(2, 576, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and m._train[0].grad is not None
    m.end_training(keep=False)


def test_half_precision_inputs_come_back_in_their_dtype():
    m = random_aqlm(192, 576, 2, 8)
    x = torch.randn(1, 576)
    y = m(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    reference = m(x)
    assert (y.float() - reference).abs().max() <= 1e-2 * reference.abs().max()
