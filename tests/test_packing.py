"""Bit packing round trips for every width and odd shapes; the standard GPTQ int32 layout."""
import pytest
import torch

from casp.errors import CaspError
from casp.quant.packing import (pack_bits, pack_int32, packed_size, unpack_bits,
                                unpack_int32)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (13, 17), (64, 576)])
def test_bit_stream_round_trip(bits, shape):
    g = torch.Generator().manual_seed(bits * 100 + len(shape))
    codes = torch.randint(0, 2**bits, shape, generator=g)
    packed = pack_bits(codes, bits)
    n = codes.numel()
    assert packed.dtype == torch.uint8
    assert packed.numel() == (n * bits + 7) // 8 == packed_size(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n).view(shape).long(), codes)


def test_bit_stream_layout_is_msb_first():
    # 2-bit codes 3,0,1,2 -> 11 00 01 10 = 0b11000110
    assert pack_bits(torch.tensor([3, 0, 1, 2]), 2).tolist() == [0b11000110]
    # 3-bit codes 5, 6, 7 -> 101 110 111 (+ 7 padding zeros) = 10111011 10000000
    assert pack_bits(torch.tensor([5, 6, 7]), 3).tolist() == [0b10111011, 0b10000000]


def test_codes_out_of_range_are_refused():
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(CaspError):
        pack_bits(torch.tensor([1]), 9)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_gptq_int32_round_trip(bits, dim):
    per_word = 32 // bits
    shape = (per_word * 3, 5) if dim == 0 else (5, per_word * 3)
    codes = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(bits))
    words = pack_int32(codes, bits, dim)
    assert words.dtype == torch.int32
    assert words.shape[dim] == 3
    assert torch.equal(unpack_int32(words, bits, dim), codes)


def test_gptq_int32_first_code_in_lowest_bits():
    codes = torch.tensor([[1], [2], [3]] + [[0]] * 13)     # 16 two-bit codes along dim 0
    word = pack_int32(codes, 2, 0)
    assert word.item() == 1 | (2 << 2) | (3 << 4)
    top = torch.tensor([[0]] * 15 + [[3]])                 # the top code sets the sign bit
    assert pack_int32(top, 2, 0).item() == -(2**30)


def test_gptq_int32_rejects_widths_and_sizes_it_cannot_store():
    with pytest.raises(CaspError, match="2, 4, 8"):
        pack_int32(torch.zeros(32, 1, dtype=torch.long), 3, 0)
    with pytest.raises(CaspError, match="multiple of 16"):
        pack_int32(torch.zeros(20, 1, dtype=torch.long), 2, 0)


def test_v1_zero_points_round_trip_even_for_zero():
    from casp.quant.gptq.export import _shift_words

    for bits in (2, 4, 8):
        zeros = torch.tensor([0, 1, 2 ** bits - 1, 0] * (8 // bits))     # one int32 word
        words = pack_int32(zeros[None, :], bits, dim=1)
        stored = _shift_words(words, bits, -1)
        assert not torch.equal(stored, words)
        assert torch.equal(unpack_int32(_shift_words(stored, bits, +1), bits, 1)[0], zeros)
