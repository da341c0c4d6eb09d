"""Quantized linears with random codes in a given setting: the same modules, storage and
kernels as a real checkpoint's, without running a quantizer. For speed and memory
measurements (bench/efficiency.py: a format's decode speed does not depend on the code
values) and for the kernel tests; never for quality.

``quantize_randomly(model, spec, settings)`` replaces every quantizable linear of the
decoder (and the factors of low-rank W_q/W_k) by one with the setting named for it: a
plan's module entries (casp allocate), or one uniform entry for all.
"""
from __future__ import annotations

import torch
from torch import nn

from casp.quant.layer_groups import quantizable_linears
from casp.quant.aqlm.linear import AQLMLinear
from casp.quant.aqlm.setting import AQLMSetting
from casp.quant.gptq.linear import GPTQLinear
from casp.quant.quip.linear import QuIPLinear


def random_gptq(out_f: int, in_f: int, bits: int, group_size: int = 128,
                act_order: bool = False, bias: bool = False, seed: int = 0) -> GPTQLinear:
    """Codes uniform over 0..2^bits-1, scales in [0.01, 0.11], zeros uniform; with
    ``act_order`` the group indices of a random permutation (as GPTQ's act-order writes)."""
    g = torch.Generator().manual_seed(seed)
    m = GPTQLinear(in_f, out_f, bits, group_size, g_idx=act_order, bias=bias)
    with torch.no_grad():
        m.qweight.copy_(torch.randint(0, 256, m.qweight.shape, generator=g, dtype=torch.uint8))
        m.scales.copy_((torch.rand(m.scales.shape, generator=g) * 0.1 + 0.01).half())
        m.zeros.copy_(torch.randint(0, 1 << bits, m.zeros.shape, generator=g).half())
        if act_order:
            perm = torch.randperm(in_f, generator=g)
            groups = torch.empty(in_f, dtype=torch.long)
            groups[perm] = torch.arange(in_f) // m.group_size
            m.g_idx.copy_(groups.to(torch.int16))
        if bias:
            m.bias.copy_(torch.randn(out_f, generator=g))
    return m


def random_aqlm(out_f: int, in_f: int, books: int, nbits: int, group: int = 8,
                bias: bool = False, seed: int = 0) -> AQLMLinear:
    """Codes uniform, codebooks standard normal, scales in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    m = AQLMLinear(in_f, out_f, books, nbits, group, bias=bias)
    with torch.no_grad():
        codes = torch.randint(-(1 << (nbits - 1)), 1 << (nbits - 1), m.codes.shape, generator=g)
        m.codes.copy_(codes.to(m.codes.dtype))
        m.codebooks.copy_(torch.randn(m.codebooks.shape, generator=g).half())
        m.scales.copy_((torch.rand(m.scales.shape, generator=g) + 0.5).half())
        if bias:
            m.bias.copy_(torch.randn(out_f, generator=g))
    return m


def random_quip(out_f: int, in_f: int, codebook: str, bias: bool = False,
                seed: int = 0) -> QuIPLinear:
    """Codes uniform over every stage's codebook, random sign bits, scale 0.7."""
    g = torch.Generator().manual_seed(seed)
    m = QuIPLinear(in_f, out_f, codebook, bias=bias)
    with torch.no_grad():
        m.codes.copy_(torch.randint(-1 << 15, 1 << 15, m.codes.shape, generator=g)
                      .to(torch.int16))
        if m.resid_codes is not None:
            low, high = (0, 256) if m.resid_codes.dtype == torch.uint8 else (-1 << 15, 1 << 15)
            m.resid_codes.copy_(torch.randint(low, high, m.resid_codes.shape, generator=g)
                                .to(m.resid_codes.dtype))
        m.su.copy_(torch.randint(0, 256, m.su.shape, generator=g, dtype=torch.uint8))
        m.sv.copy_(torch.randint(0, 256, m.sv.shape, generator=g, dtype=torch.uint8))
        m.scale.fill_(0.7)
        if bias:
            m.bias.copy_(torch.randn(out_f, generator=g))
    return m


def random_module(linear: nn.Linear, quantizer: str, entry: dict, act_order: bool = True,
                  seed: int = 0) -> nn.Module:
    """A random-code module of ``linear``'s shape for a plan entry of ``quantizer``
    ({"bits", "group_size"} for GPTQ, {"codebooks"} for AQLM, {"quip_codebook"} for QuIP#)."""
    out_f, in_f = linear.weight.shape
    bias = linear.bias is not None
    if quantizer == "gptq":
        return random_gptq(out_f, in_f, entry["bits"], entry["group_size"], act_order, bias, seed)
    if quantizer == "aqlm":
        s = AQLMSetting.parse(entry["codebooks"], entry.get("group_size", 8))
        return random_aqlm(out_f, in_f, s.num_codebooks, s.nbits, s.in_group_size, bias, seed)
    if quantizer == "quip":
        return random_quip(out_f, in_f, entry["quip_codebook"], bias, seed)
    raise ValueError(f"unknown quantizer {quantizer!r}")


def quantize_randomly(model: nn.Module, spec, quantizer: str, modules: dict[str, dict] | None = None,
                      uniform: dict | None = None, act_order: bool = True) -> int:
    """Replace the quantizable linears of ``model`` in place: those ``modules`` names with
    their entries, every other one with ``uniform`` (if given). Returns how many."""
    count = 0
    for i, (name, linear) in enumerate(quantizable_linears(model, spec).items()):
        entry = (modules or {}).get(name, uniform)
        if entry is None:
            continue
        model.set_submodule(name, random_module(linear, quantizer, entry, act_order, seed=i))
        count += 1
    return count
