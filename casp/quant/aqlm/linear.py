"""The AQLM-quantized linear as stored by casp.

Storage (buffers, saved in the checkpoint) is exactly the layout of ``aqlm.QuantizedLinear``
(out_group_size 1):
    codes      int8 / int16 [out, in / in_group_size, num_codebooks]  (two's complement)
    codebooks  float16 [num_codebooks, 2^nbits, 1, in_group_size]
    scales     float16 [out, 1, 1, 1]
    bias       (if the original had one)
On the CPU the forward runs casp's own kernels (casp.kernels.aqlm_cpu: multi-threaded and
exact, where the aqlm package's numba kernel races with more than one thread). On GPU it
hands these tensors to an ``aqlm.QuantizedLinear`` (its CUDA/Triton kernels, in the
input's dtype), or runs the dequantized weight when those kernels cannot be built.
``cache_weight()`` instead keeps the dequantized weight for repeated forwards (the
quantization passes use it for the rest of a layer).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from casp.errors import CaspError
from casp.kernels.aqlm_cpu import (TABLE_MAX_CODES, aqlm_dequantize_rows, aqlm_direct_matmul,
                                   aqlm_table_matmul, codeword_products)
from casp.kernels.packed_matmul import run_linear
from casp.modules import register_module_type
from casp.quant.aqlm.quantize import AQLMResult, dequantize, from_storage_codes, to_storage_codes
from casp.quant.aqlm.setting import AQLMSetting, described_bits
from casp.quant.stored import StoredLinear

log = logging.getLogger("casp")
_warned_no_kernel = False


@contextlib.contextmanager
def serial_numba(enabled: bool = True):
    """Run the aqlm CPU kernel on one numba thread. aqlm 1.1.7's numba kernel parallelises
    over input groups while every group adds into the same output entries (a data race):
    with two or more threads its results are wrong (measured here: errors of order 10 on
    outputs of order 10, exact with one thread)."""
    if not enabled:
        yield
        return
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def _aqlm_quantized_linear():
    try:
        from aqlm import QuantizedLinear
    except ImportError as exc:                       # pragma: no cover - a declared dependency
        raise CaspError(f"running AQLM modules needs the aqlm package ({exc}); install it with "
                        "pip install 'aqlm[cpu]' (add gpu on CUDA machines)")
    return QuantizedLinear


@dataclass
class AQLMKernelLayout:
    """What casp.kernels.aqlm_cpu reads: the codes as unsigned integers, the codebooks
    float32 [M, K, d] and transposed [M, d, K], the scales float32 [out], and whether the
    table kernel runs (codebooks of up to 256 entries)."""
    codes: np.ndarray
    codebooks: np.ndarray
    books_t: np.ndarray
    scales: np.ndarray
    use_table: bool


@register_module_type
class AQLMLinear(StoredLinear):
    type_name = "aqlm"
    device_kernels = True       # the aqlm package's CUDA / Triton kernels
    fp16_buffers = ("codebooks", "scales")
    stored_tensors = ("codes", "codebooks", "scales")
    described_bits = staticmethod(described_bits)

    def __init__(self, in_features: int, out_features: int, num_codebooks: int,
                 nbits_per_codebook: int, in_group_size: int = 8, bias: bool = False,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.setting = AQLMSetting(num_codebooks, nbits_per_codebook, in_group_size)
        self.setting.check(out_features, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.num_codebooks, self.nbits_per_codebook = num_codebooks, nbits_per_codebook
        self.in_group_size, self.out_group_size = in_group_size, 1
        code_dtype = torch.int8 if nbits_per_codebook <= 8 else torch.int16
        self.register_buffer("codes", torch.zeros(out_features, in_features // in_group_size,
                                                  num_codebooks, dtype=code_dtype, device=device))
        self.register_buffer("codebooks", torch.zeros(num_codebooks, 2 ** nbits_per_codebook, 1,
                                                      in_group_size, dtype=torch.float16,
                                                      device=device))
        self.register_buffer("scales", torch.zeros(out_features, 1, 1, 1, dtype=torch.float16,
                                                   device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self._runner: nn.Module | None = None

    @classmethod
    def from_result(cls, result: AQLMResult, bias: torch.Tensor | None,
                    dtype: torch.dtype) -> "AQLMLinear":
        s = result.setting
        out_f = result.codes.shape[0]
        in_f = result.codes.shape[1] * s.in_group_size
        module = cls(in_f, out_f, s.num_codebooks, s.nbits, s.in_group_size,
                     bias=bias is not None, dtype=dtype, device=result.codes.device)
        with torch.no_grad():
            module.codes.copy_(to_storage_codes(result.codes, s.nbits))
            module.codebooks.copy_(result.codebooks.unsqueeze(2).half())
            module.scales.copy_(result.scales.reshape(-1, 1, 1, 1).half())
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def code_indices(self) -> torch.Tensor:
        """Codes as 0..2^B-1, int64 [out, groups, M]."""
        return from_storage_codes(self.codes, self.nbits_per_codebook)

    def decode_weight(self) -> torch.Tensor:
        return dequantize(self.code_indices(), self.codebooks.float().squeeze(2),
                          self.scales.float())

    def kernel_module(self, device: torch.device, dtype: torch.dtype) -> nn.Module:
        """An ``aqlm.QuantizedLinear`` holding this module's tensors (cached)."""
        runner = self._runner
        if runner is None or runner.codebooks.device != device or runner.codebooks.dtype != dtype:
            cls = _aqlm_quantized_linear()
            runner = cls(self.in_features, self.out_features, self.in_group_size, 1,
                         self.num_codebooks, self.nbits_per_codebook,
                         bias=self.bias is not None, device=device, dtype=dtype)
            with torch.no_grad():
                # the CPU kernel re-lays out its own copy of the codes on first use
                runner.codes.data = self.codes.detach().clone().to(device)
                runner.codebooks.data = self.codebooks.detach().to(device, dtype)
                runner.scales.data = self.scales.detach().to(device, dtype)
                if self.bias is not None:
                    runner.bias.data = self.bias.detach().to(device, dtype)
            # kept out of the module tree: not a submodule, not in the state dict
            object.__setattr__(self, "_runner", runner)
        return runner

    def begin_training(self) -> list[nn.Parameter]:
        """Float32 trainable copies of the codebooks and scales (codes fixed); the forward
        pass decodes through them, differentiably, until :meth:`end_training`."""
        self._train = [nn.Parameter(self.codebooks.float().squeeze(2).clone()),
                       nn.Parameter(self.scales.float().reshape(-1).clone())]
        return self._train

    def end_training(self, keep: bool = True) -> None:
        """Store the trained codebooks and scales (rounded to fp16), or drop them."""
        books, scales = self._train
        self._train = None
        if keep:
            with torch.no_grad():
                self.codebooks.copy_(books.detach().unsqueeze(2).half())
                self.scales.copy_(scales.detach().reshape(-1, 1, 1, 1).half())
        self._runner = None
        if self._cached is not None:
            self._cached = None
            self.cache_weight()

    def cpu_layout(self) -> AQLMKernelLayout:
        unsigned = torch.uint8 if self.nbits_per_codebook <= 8 else torch.uint16
        mask = (1 << self.nbits_per_codebook) - 1
        codes = self.codes.view(unsigned).numpy()
        if self.nbits_per_codebook not in (8, 16):
            codes = np.ascontiguousarray(codes & mask)
        books = self.codebooks.float().squeeze(2).numpy().copy()          # [M, K, d]
        books_t = np.ascontiguousarray(books.transpose(0, 2, 1))
        return AQLMKernelLayout(codes, books, books_t, self.scales.float().reshape(-1).numpy()
                                .copy(), books.shape[1] <= TABLE_MAX_CODES)

    def cpu_forward(self, x: torch.Tensor, layout: AQLMKernelLayout) -> torch.Tensor:
        def fused(xs, ys):
            if layout.use_table:
                n_books, d, n_codes = layout.books_t.shape
                table = np.empty((xs.shape[0], self.in_features // d, n_books, n_codes),
                                 dtype=np.float32)
                codeword_products(xs, layout.books_t, table)
                aqlm_table_matmul(table, layout.codes, layout.scales, ys)
            else:
                aqlm_direct_matmul(xs, layout.codes, layout.codebooks, layout.scales, ys)

        def tile(first, out):
            aqlm_dequantize_rows(layout.codes, layout.codebooks, layout.scales, first, out)

        return run_linear(x, self.out_features, fused, tile, self.bias)

    def device_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._train is not None:
            books, scales = self._train
            return self.dense_forward(x, dequantize(self.code_indices(), books, scales))
        if x.device.type == "cpu":
            return self.dense_forward(x, self.dequantized_weight())
        runner = self.kernel_module(x.device, x.dtype)
        try:
            return runner(x.contiguous())
        except (ImportError, RuntimeError) as exc:
            # the CUDA / Triton kernels are built on first use; without a toolchain
            # (or aqlm[gpu]) run the dequantized weight instead, and say so once
            if not _warned_no_kernel:
                log.warning("aqlm GPU kernels unavailable (%s); AQLM modules run as a "
                            "dequantized matmul", str(exc).splitlines()[0][:200])
                globals()["_warned_no_kernel"] = True
            self.cache_weight()
            return self.forward(x)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._runner = None                 # rebuilt on the new device at the next forward
        return self

    def describe(self) -> dict:
        return {"type": self.type_name, "in_features": self.in_features,
                "out_features": self.out_features, "num_codebooks": self.num_codebooks,
                "nbits_per_codebook": self.nbits_per_codebook,
                "in_group_size": self.in_group_size, "out_group_size": 1,
                "bias": self.bias is not None}

    @classmethod
    def from_description(cls, d: dict, dtype: torch.dtype | None = None) -> "AQLMLinear":
        if d.get("out_group_size", 1) != 1:
            raise CaspError("this checkpoint has AQLM out_group_size "
                            f"{d['out_group_size']}; casp runs out_group_size 1 only")
        return cls(d["in_features"], d["out_features"], d["num_codebooks"],
                   d["nbits_per_codebook"], d["in_group_size"], bias=d.get("bias", False),
                   dtype=dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"setting={self.setting.name}, group={self.in_group_size}")
