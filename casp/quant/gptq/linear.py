"""The GPTQ-quantized linear as stored and run by casp.

Storage (buffers, all saved in the checkpoint):
    qweight  uint8 [ceil(out * in * bits / 8)]   codes, row-major, a dense bit stream
    scales   float16 [out, groups]
    zeros    float16 [out, groups]                integer zero points
    g_idx    int16 [in]                           only for dynamic act-order groups
    bias     (if the original had one)
On the CPU the forward runs casp.kernels.gptq_cpu from the packed codes (the input's
columns sorted by group when there are act-order group indices: the kernels read a copy of
the codes in that order, the same size as the stored ones). Elsewhere, and for inputs or
groups whose length is not a multiple of 8, it dequantizes the weight and runs one matmul
in the input's dtype (no GPTQ kernel for CUDA has been tested here). ``cache_weight()``
keeps the dequantized weight for repeated evaluation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from casp.kernels.gptq_cpu import LANES, gptq_dequantize_rows, gptq_matmul, plane_layout
from casp.kernels.packed_matmul import run_linear
from casp.modules import register_module_type
from casp.quant.gptq.quantize import (GPTQResult, check_bits, dequantize, described_bits,
                                      effective_group_size)
from casp.quant.packing import pack_bits, packed_size, unpack_bits
from casp.quant.stored import StoredLinear


@dataclass
class GPTQKernelLayout:
    """What casp.kernels.gptq_cpu reads: the codes as bit planes in blocks of 16 rows with
    columns in kernel order (``plane_layout``), the column ranges of the groups, float32
    scales and zeros (zero rows up to the blocks' end), and the input permutation into
    that order (None: the natural order)."""
    packed: np.ndarray
    widths: np.ndarray
    shifts: np.ndarray
    offsets: np.ndarray
    starts: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    columns: torch.Tensor | None
    column_order: np.ndarray          # the same as int64 (empty: the natural order)


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
        scales = self._train[0] if self._train is not None else self.scales
        return dequantize(self.codes(), scales, self.zeros, self.group_size, self.g_idx)

    def begin_training(self) -> list[nn.Parameter]:
        """A float32 trainable copy of the scales (codes and zero points fixed); the forward
        pass decodes through it, differentiably, until :meth:`end_training`."""
        self._train = [nn.Parameter(self.scales.float().clone())]
        return self._train

    def end_training(self, keep: bool = True) -> None:
        """Store the trained scales (rounded to fp16), or drop them."""
        (scales,) = self._train
        self._train = None
        if keep:
            with torch.no_grad():
                self.scales.copy_(scales.detach().half())
        if self._cached is not None:
            self._cached = None
            self.cache_weight()

    def cpu_layout(self) -> GPTQKernelLayout | None:
        n_groups = self.scales.shape[1]
        codes = self.codes()
        if self.g_idx is None:
            starts = np.minimum(np.arange(n_groups + 1) * self.group_size, self.in_features)
            columns = None
        else:
            g_idx = self.g_idx.long()
            columns = torch.argsort(g_idx, stable=True)
            counts = torch.bincount(g_idx, minlength=n_groups)
            starts = np.concatenate([[0], np.cumsum(counts.numpy())])
            codes = codes[:, columns]
        if self.in_features % 8 or np.any(np.diff(starts) % 8):
            return None
        planes = plane_layout(codes.to(torch.uint8).numpy(), self.bits)
        rows = planes[0].shape[0] * LANES
        scales = np.zeros((rows, n_groups), dtype=np.float32)
        zeros = np.zeros((rows, n_groups), dtype=np.float32)
        scales[:self.out_features] = self.scales.float().numpy()
        zeros[:self.out_features] = self.zeros.float().numpy()
        order = np.zeros(0, np.int64) if columns is None else columns.numpy().astype(np.int64)
        return GPTQKernelLayout(*planes, starts.astype(np.int64), scales, zeros, columns, order)

    def cpu_forward(self, x: torch.Tensor, layout: GPTQKernelLayout) -> torch.Tensor:
        planes = (layout.packed, layout.widths, layout.shifts, layout.offsets, layout.starts,
                  layout.scales, layout.zeros)

        def fused(xs, ys):
            gptq_matmul(xs, layout.column_order, *planes, ys)

        def tile(first, out):
            gptq_dequantize_rows(*planes, first, out)

        return run_linear(x, self.out_features, fused, tile, self.bias, layout.columns)

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
