"""What casp's quantized linears share: a weight decoded from what is stored, an optional
cache of it, fp16 storage that dtype moves leave alone, the stored bits, and the choice of
how a forward runs:

- on the CPU, the format's kernels straight from the stored codes (casp.kernels), with the
  layout they read built once and rebuilt when a stored tensor changes;
- with autograd (fine-tuning: trainable copies, or an input that needs a gradient), on
  other devices, and for shapes a kernel does not take, ``device_forward`` (the whole
  weight decoded, or the aqlm package's CUDA kernels);
- after ``cache_weight()``, one matmul with the kept dequantized weight.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from casp.kernels.packed_matmul import kernels_enabled

log = logging.getLogger("casp")
_said_no_kernel: set[str] = set()
_said_no_device: set[str] = set()


class StoredLinear(nn.Module):
    """Base of the quantized linears. Subclasses set ``fp16_buffers`` (stored tensors that
    ``.to(dtype)`` must not touch) and ``stored_tensors`` (the tensor names a checkpoint
    holds of it), and implement ``decode_weight()`` (float32 [out, in] from storage),
    ``describe()`` and ``described_bits(description)`` (its stored bits)."""

    fp16_buffers: tuple[str, ...] = ()

    device_kernels = False      # True: device_forward runs real kernels off the CPU (AQLM)

    def __init__(self):
        super().__init__()
        self._cached: torch.Tensor | None = None
        self._train: list[nn.Parameter] | None = None
        self._layout: tuple | None = None

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = self._train is not None
        if self._cached is not None and not training:
            return self.dense_forward(x, self._cached)
        if (x.is_cpu and not training and not (x.requires_grad and torch.is_grad_enabled())
                and kernels_enabled()):
            layout = self.kernel_layout()
            if layout is not None:
                return self.cpu_forward(x, layout)
        elif not x.is_cpu and not self.device_kernels and self.type_name not in _said_no_device:
            _said_no_device.add(self.type_name)
            log.info("%s modules on %s run as a dequantized matmul (casp has no tested %s "
                     "kernel for this device)", self.type_name, x.device.type, self.type_name)
        return self.device_forward(x)

    def device_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward without the CPU kernels (default: the whole weight decoded)."""
        return self.dense_forward(x, self.dequantized_weight())

    def cpu_layout(self):
        """What this format's CPU kernels read, built from the stored tensors; None when
        this module's shape has no kernel (it then runs ``device_forward``)."""
        return None

    def cpu_forward(self, x: torch.Tensor, layout) -> torch.Tensor:
        raise NotImplementedError

    def kernel_layout(self):
        """``cpu_layout()``, kept until a stored tensor is replaced or changed in place."""
        tensors = [t for t in map(self._buffers.get, self.stored_tensors) if t is not None]
        key = [(id(t), t._version) for t in tensors]
        if self._layout is None or self._layout[0] != key:
            layout = self.cpu_layout()
            if layout is None and self.type_name not in _said_no_kernel:
                _said_no_kernel.add(self.type_name)
                log.info("a %s module of shape %s has no CPU kernel; it runs as a dequantized "
                         "matmul", self.type_name, (self.out_features, self.in_features))
            # the tensors are kept with the key: alive, their ids cannot be reused
            self._layout = (key, layout, tensors)
        return self._layout[1]

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
        self._layout = None
        return self

    def trained_as_stored(self) -> None:
        """Round the parameters being fine-tuned (``self._train``, set by a subclass's
        ``begin_training``) to what will be stored: fp16."""
        with torch.no_grad():
            for p in self._train:
                p.copy_(p.half().float())

    def storage_bits(self) -> int:
        return self.described_bits(self.describe())
