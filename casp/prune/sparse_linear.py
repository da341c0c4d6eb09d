"""A pruned linear stored compactly: a bitmask of the kept weights (1 bit per weight, packed
8 to a byte along each row) and the kept values in row-major order (the model's dtype).

Bytes per weight: 1/8 + (1 - sparsity) * value bytes; at 50% and fp16 values 1.125 against
the dense 2. The N:M forms need no other layout: positions of 2 kept of 4 as 2-bit indices
cost 4 bits per 4 weights, the bitmask's very cost. The forward decodes the dense weight
once and keeps it (CPU sparse matmuls at 50% are no faster than dense ones); the saving is
on disk and in transfer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from casp.modules import register_module_type

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """Boolean [out, in] -> uint8 [out, ceil(in / 8)], bit b of byte k = column 8k + b."""
    out_f, in_f = keep.shape
    padded = torch.zeros(out_f, -(-in_f // 8) * 8, dtype=torch.uint8, device=keep.device)
    padded[:, :in_f] = keep.to(torch.uint8)
    bits = padded.view(out_f, -1, 8) * _BIT_WEIGHTS.to(keep.device)
    return bits.sum(dim=2, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    bits = packed[:, :, None] & _BIT_WEIGHTS.to(packed.device)
    return (bits != 0).reshape(packed.shape[0], -1)[:, :in_features]


def stored_bytes(out_features: int, in_features: int, kept: int, value_bytes: int) -> int:
    """Bytes of the mask and the kept values (the bias is stored as a dense linear's)."""
    return out_features * -(-in_features // 8) + kept * value_bytes


@register_module_type
class SparseLinear(nn.Module):
    """y = x W^T + b with W rebuilt from (mask, values)."""

    type_name = "sparse"
    stored_tensors = ("mask", "values")

    def __init__(self, in_features: int, out_features: int, kept: int, bias: bool = False,
                 pattern: str = "", dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.kept = in_features, out_features, kept
        self.pattern = pattern
        self.register_buffer("mask", torch.zeros(out_features, -(-in_features // 8),
                                                 dtype=torch.uint8, device=device))
        self.register_buffer("values", torch.zeros(kept, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) \
            if bias else None
        self._dense: torch.Tensor | None = None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None,
                    pattern: str = "") -> "SparseLinear":
        """The module of a pruned ``weight`` [out, in] whose kept entries are ``keep``."""
        out_f, in_f = weight.shape
        module = cls(in_f, out_f, int(keep.sum()), bias is not None, pattern,
                     dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            module.mask.copy_(pack_mask(keep))
            module.values.copy_(weight[keep])
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def dense_weight(self) -> torch.Tensor:
        keep = unpack_mask(self.mask, self.in_features)
        weight = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype,
                             device=self.values.device)
        weight[keep] = self.values
        return weight

    @property
    def weight(self) -> torch.Tensor:
        return self.dense_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (self.values.device, self.values.dtype, self.values._version, self.mask._version)
        if self._dense is None or self._dense[0] != key:
            self._dense = (key, self.dense_weight())
        weight = self._dense[1]
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight.to(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        self._dense = None
        return super()._apply(fn, recurse)

    def sparsity(self) -> float:
        return 1 - self.kept / (self.in_features * self.out_features)

    def describe(self) -> dict:
        return {"type": self.type_name, "in_features": self.in_features,
                "out_features": self.out_features, "kept": self.kept,
                "bias": self.bias is not None, "pattern": self.pattern,
                "sparsity": round(self.sparsity(), 6)}

    @classmethod
    def from_description(cls, d: dict, dtype: torch.dtype | None = None) -> "SparseLinear":
        return cls(d["in_features"], d["out_features"], d["kept"], d.get("bias", False),
                   d.get("pattern", ""), dtype=dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"sparsity={self.sparsity():.3f}")
