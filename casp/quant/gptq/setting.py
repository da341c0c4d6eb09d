"""GPTQ's setting as a plan sees it: bits, group size, group indices, and what that stores
(codes, fp16 scale and zero per group, int16 group index per column with dynamic act-order
groups; casp.quant.gptq.quantize.stored_bits)."""
from __future__ import annotations

from dataclasses import dataclass

from casp.quant.gptq.quantize import effective_group_size, stored_bits


@dataclass
class QuantSetting:
    """How a module is stored: bits, group size (-1: per channel), group indices or not."""
    bits: int
    group_size: int
    g_idx: bool = False

    def cost(self, out_features: int, in_features: int) -> int:
        return stored_bits(out_features, in_features, self.bits, self.group_size, self.g_idx)

    def check(self, out_features: int, in_features: int, name: str = "the module") -> None:
        effective_group_size(in_features, self.group_size)

    def plan_entry(self) -> dict:
        """What a plan records of the setting besides its width."""
        return {"group_size": self.group_size}
