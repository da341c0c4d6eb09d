"""Bit packing: unsigned integers of any width 1-8 as a dense bit stream, and the int32
layout of the standard GPTQ format.

The casp layout stores N codes of width b in ceil(N * b / 8) bytes, so a checkpoint's size
is what its bits claim for every width (3, 5, 6 and 7 bits included).
"""
from __future__ import annotations

import torch

from casp.errors import CaspError


def _check_width(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise CaspError(f"bit width {bits} is not supported; use 2 to 8 bits")


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of width ``bits`` occupy."""
    return (count * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) (any shape, read in row-major order) into a flat
    uint8 tensor: code i occupies bits [i*b, (i+1)*b) of the stream, most significant first.
    Eight codes fill exactly ``bits`` bytes, so the work is done eight codes at a time."""
    _check_width(bits)
    count = codes.numel()
    flat = codes.reshape(-1).to(torch.int64)
    if count and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes outside [0, {1 << bits}) cannot be packed in {bits} bits")
    flat = torch.nn.functional.pad(flat, (0, (-count) % 8)).view(-1, 8)
    code_shifts = bits * torch.arange(7, -1, -1, device=flat.device)
    words = (flat << code_shifts).sum(dim=1)                       # 8 * bits <= 64 bits
    byte_shifts = 8 * torch.arange(bits - 1, -1, -1, device=flat.device)
    stream = ((words[:, None] >> byte_shifts) & 0xFF).reshape(-1)
    return stream[:packed_size(count, bits)].to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes, as a flat uint8 tensor."""
    _check_width(bits)
    if packed.numel() != packed_size(count, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold exactly {count} codes of {bits} bits")
    stream = torch.nn.functional.pad(packed.to(torch.int64), (0, (-packed.numel()) % bits))
    byte_shifts = 8 * torch.arange(bits - 1, -1, -1, device=packed.device)
    words = (stream.view(-1, bits) << byte_shifts).sum(dim=1)
    code_shifts = bits * torch.arange(7, -1, -1, device=packed.device)
    codes = (words[:, None] >> code_shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:count].to(torch.uint8)


# ----- the standard GPTQ int32 layout (AutoGPTQ / GPTQModel / transformers "gptq") -----
# Codes are packed 32 // bits per int32 word, the first code in the lowest bits. qweight
# packs along the input dimension ([in * bits / 32, out]); qzeros along the output dimension
# ([groups, out * bits / 32]). Only widths that divide 32 (2, 4, 8) have this simple layout.

GPTQ_INT32_WIDTHS = (2, 4, 8)


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack ``codes`` (2-D, values in [0, 2^bits)) along ``dim`` into int32 words."""
    if bits not in GPTQ_INT32_WIDTHS:
        raise CaspError(f"the standard GPTQ format is written here for {GPTQ_INT32_WIDTHS} bits, "
                        f"not {bits}")
    per_word = 32 // bits
    c = codes.to(torch.int64).movedim(dim, 0)
    if c.shape[0] % per_word:
        raise CaspError(f"dimension {c.shape[0]} is not a multiple of {per_word}: the standard GPTQ "
                        f"format cannot store it at {bits} bits")
    c = c.reshape(c.shape[0] // per_word, per_word, *c.shape[1:])
    shifts = (torch.arange(per_word, dtype=torch.int64) * bits).view(1, per_word,
                                                                     *[1] * (c.dim() - 2))
    words = (c << shifts).sum(dim=1)
    words = torch.where(words >= 2**31, words - 2**32, words)   # two's complement int32
    return words.to(torch.int32).movedim(0, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int64 codes."""
    per_word = 32 // bits
    w = words.to(torch.int64).movedim(dim, 0) & 0xFFFFFFFF
    shifts = (torch.arange(per_word, dtype=torch.int64) * bits).view(1, per_word,
                                                                     *[1] * (w.dim() - 1))
    codes = (w.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(w.shape[0] * per_word, *w.shape[1:]).movedim(0, dim).contiguous()
