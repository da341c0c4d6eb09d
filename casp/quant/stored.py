"""What casp's quantized linears share: a weight decoded from what is stored, an optional
cache of it, fp16 storage that dtype moves leave alone, and the stored bits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StoredLinear(nn.Module):
    """Base of the quantized linears. Subclasses set ``fp16_buffers`` (stored tensors that
    ``.to(dtype)`` must not touch) and ``stored_tensors`` (the tensor names a checkpoint
    holds of it), and implement ``decode_weight()`` (float32 [out, in] from storage),
    ``describe()`` and ``described_bits(description)`` (its stored bits)."""

    fp16_buffers: tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self._cached: torch.Tensor | None = None

    def decode_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this module computes with, float32 [out, in]."""
        if self._cached is not None:
            return self._cached.float()
        return self.decode_weight()

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized_weight()

    def cache_weight(self, enabled: bool = True) -> None:
        """Keep the dequantized weight in memory (faster repeated forwards, more memory)."""
        self._cached = self.dequantized_weight() if enabled else None

    def dense_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight.to(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        stored = {name: getattr(self, name) for name in self.fp16_buffers}
        super()._apply(fn, recurse)
        # .to(dtype) / .half() must not change what is stored (a bf16 round trip would):
        # the fp16 originals stay, only the device follows
        for name, tensor in stored.items():
            setattr(self, name, tensor.to(getattr(self, name).device))
        self._cached = None
        return self

    def trained_as_stored(self) -> None:
        """Round the parameters being fine-tuned (``self._train``, set by a subclass's
        ``begin_training``) to what will be stored: fp16."""
        with torch.no_grad():
            for p in self._train:
                p.copy_(p.half().float())

    def storage_bits(self) -> int:
        return self.described_bits(self.describe())
