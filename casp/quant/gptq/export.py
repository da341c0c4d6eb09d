"""Export to the standard GPTQ checkpoint format that transformers (through its GPTQ
integration) and vLLM load, for models with no low-rank modules and one global setting.

Per quantized linear ``<name>``:
    <name>.qweight  int32 [in * bits / 32, out]   codes packed along the input dimension
    <name>.qzeros   int32 [groups, out * bits / 32] zero points packed along the output
                    dimension; format "gptq_v2" stores the zeros themselves, "gptq" (v1)
                    stores each packed word minus 0x..1111 (one per field, subtracted from
                    the whole word as GPTQModel does, so a zero of 0 borrows from the next
                    field and the loader's whole-word addition restores it exactly)
    <name>.scales   float16 [groups, out]
    <name>.g_idx    int32 [in]                     group of each input column
    <name>.bias     (if any)
and config.json gets ``quantization_config`` {quant_method: "gptq", bits, group_size,
desc_act, sym: false, checkpoint_format, ...}. Dequantization: W[:, c] = scale[g] *
(q[c] - zero[g]) with g = g_idx[c].
"""
from __future__ import annotations

from pathlib import Path

import torch

from casp.errors import CaspError
from casp.hf_model import LoadedModel
from casp.quant.export import refuse_lowrank, stored_key, write_standard
from casp.quant.gptq.linear import GPTQLinear
from casp.quant.packing import GPTQ_INT32_WIDTHS, pack_int32, unpack_int32

FORMATS = ("gptq", "gptq_v2")


def export_gptq(loaded: LoadedModel, output: str | Path, overwrite: bool = False,
                checkpoint_format: str = "gptq") -> Path:
    if checkpoint_format not in FORMATS:
        raise CaspError(f"unknown GPTQ checkpoint format {checkpoint_format!r}; use one of {FORMATS}")
    refuse_lowrank(loaded, "GPTQ")
    quantized = {n: m for n, m in loaded.model.named_modules() if isinstance(m, GPTQLinear)}
    if not quantized:
        raise CaspError("the model has no GPTQ-quantized modules to export")
    settings = {(m.bits, m.group_size if m.group_size < m.in_features else -1)
                for m in quantized.values()}
    if len(settings) != 1:
        raise CaspError("the standard GPTQ format holds one global setting; this model mixes "
                        f"{sorted(settings)}: keep the casp checkpoint")
    bits, group_size = settings.pop()
    if bits not in GPTQ_INT32_WIDTHS:
        raise CaspError(f"the standard GPTQ format is exported for {GPTQ_INT32_WIDTHS} bits, not "
                        f"{bits}; keep the casp checkpoint")
    desc_act = any(m.g_idx is not None for m in quantized.values())

    def convert(state: dict) -> None:
        for name, module in quantized.items():
            key = stored_key(state, name, "qweight")
            for suffix in ("qweight", "scales", "zeros", "g_idx"):
                state.pop(f"{key}.{suffix}", None)
            state.update({f"{key}.{k}": v for k, v in
                          gptq_tensors(module, checkpoint_format).items()})

    config = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
              "desc_act": desc_act, "sym": False, "true_sequential": True,
              "checkpoint_format": checkpoint_format, "pack_dtype": "int32"}
    return write_standard(loaded, output, overwrite, convert, config)


def gptq_tensors(module: GPTQLinear, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """One casp GPTQLinear in the standard layout."""
    bits, in_f = module.bits, module.in_features
    codes = module.codes().to(torch.int64)                         # [out, in]
    zeros = module.zeros.to(torch.int64)                           # [out, groups]
    if module.g_idx is not None:
        g_idx = module.g_idx.to(torch.int32)
    else:
        g_idx = (torch.arange(in_f) // module.group_size).to(torch.int32)
    qzeros = pack_int32(zeros.T, bits, dim=1)
    if checkpoint_format == "gptq":
        qzeros = _shift_words(qzeros, bits, -1)
    tensors = {"qweight": pack_int32(codes.T, bits, dim=0),
               "qzeros": qzeros,
               "scales": module.scales.T.contiguous().to(torch.float16),
               "g_idx": g_idx}
    if module.bias is not None:
        tensors["bias"] = module.bias.detach().to(torch.float16)
    return tensors


def dequantize_gptq_tensors(tensors: dict[str, torch.Tensor], bits: int,
                            checkpoint_format: str = "gptq") -> torch.Tensor:
    """The float32 weight [out, in] a standard GPTQ module stands for (for checks)."""
    codes = unpack_int32(tensors["qweight"], bits, dim=0).T.float()     # [out, in]
    qzeros = tensors["qzeros"]
    if checkpoint_format == "gptq":
        qzeros = _shift_words(qzeros, bits, +1)
    zeros = unpack_int32(qzeros, bits, dim=1).T.float()                 # [out, groups]
    g = tensors["g_idx"].long()
    return tensors["scales"].T.float()[:, g] * (codes - zeros[:, g])


def _shift_words(words: torch.Tensor, bits: int, sign: int) -> torch.Tensor:
    """Add (sign=+1) or subtract (-1) one in every field of int32 words, as whole 32-bit
    words with wrap-around (the v1 format's zero-point convention)."""
    ones = sum(1 << (bits * k) for k in range(32 // bits))
    w = (words.to(torch.int64) + sign * ones) % 2**32
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
