"""The GPTQ-quantized linear as stored and run by casp.

Storage (buffers, all saved in the checkpoint):
    qweight  uint8 [ceil(out * in * bits / 8)]   codes, row-major, a dense bit stream
    scales   float16 [out, groups]
    zeros    float16 [out, groups]                integer zero points
    g_idx    int16 [in]                           only for dynamic act-order groups
    bias     (if the original had one)
The forward pass unpacks and dequantizes the weight, then runs one matmul in the input's
dtype. ``cache_weight()`` keeps the dequantized weight for repeated evaluation.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from casp.modules import register_module_type
from casp.quant.gptq.quantize import (GPTQResult, check_bits, dequantize, described_bits,
                                      effective_group_size)
from casp.quant.packing import pack_bits, packed_size, unpack_bits
from casp.quant.stored import StoredLinear


@register_module_type
class GPTQLinear(StoredLinear):
    type_name = "gptq"
    fp16_buffers = ("scales", "zeros")
    stored_tensors = ("qweight", "scales", "zeros", "g_idx")
    described_bits = staticmethod(described_bits)

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 g_idx: bool = False, bias: bool = False, dtype: torch.dtype | None = None,
                 device=None):
        super().__init__()
        check_bits(bits)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = effective_group_size(in_features, group_size)
        groups = math.ceil(in_features / self.group_size)
        self.register_buffer("qweight", torch.zeros(packed_size(out_features * in_features, bits),
                                                    dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16,
                                                   device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.float16,
                                                  device=device))
        if g_idx:
            self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int16,
                                                      device=device))
        else:
            self.g_idx = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_result(cls, result: GPTQResult, bits: int, bias: torch.Tensor | None,
                    dtype: torch.dtype) -> "GPTQLinear":
        out_f, in_f = result.codes.shape
        module = cls(in_f, out_f, bits, result.group_size, g_idx=result.g_idx is not None,
                     bias=bias is not None, dtype=dtype, device=result.codes.device)
        with torch.no_grad():
            module.qweight.copy_(pack_bits(result.codes, bits))
            module.scales.copy_(result.scales.to(torch.float16))
            module.zeros.copy_(result.zeros)
            if result.g_idx is not None:
                module.g_idx.copy_(result.g_idx.to(torch.int16))
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def codes(self) -> torch.Tensor:
        """The integer codes [out, in]."""
        return unpack_bits(self.qweight, self.bits, self.out_features * self.in_features
                           ).view(self.out_features, self.in_features)

    def decode_weight(self) -> torch.Tensor:
        return dequantize(self.codes(), self.scales, self.zeros, self.group_size, self.g_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._cached if self._cached is not None else self.dequantized_weight()
        return self.dense_forward(x, w)

    def describe(self) -> dict:
        return {"type": self.type_name, "in_features": self.in_features,
                "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "g_idx": self.g_idx is not None,
                "bias": self.bias is not None}

    @classmethod
    def from_description(cls, d: dict, dtype: torch.dtype | None = None) -> "GPTQLinear":
        return cls(d["in_features"], d["out_features"], d["bits"], d["group_size"],
                   g_idx=d.get("g_idx", False), bias=d.get("bias", False), dtype=dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, "
                f"act_order_groups={self.g_idx is not None}")
