"""The QuIP#-quantized linear as stored by casp.

Storage (buffers, saved in the checkpoint):
    codes        int16 [out, in / 8]          E8P12 codes (16 bits per 8 weights)
    resid_codes  int16 (E8P12) or uint8 (E81B) [out, in / 8], residual codebooks only
    su, sv       uint8 [ceil(in / 8)], [ceil(out / 8)]   the random signs, one bit each
                 (after block fine-tuning: float16 [in], [out], real-valued)
    scale        float32 [1]
    bias         (if the original had one)
The forward pass runs from this packed form, y = s_out * M_out^T (Ŵ_r (M_in (s_in * x)))
with the fast transforms of casp.quant.quip.hadamard applied to the activations: on the CPU
the middle product runs casp.kernels.quip_cpu from the codes; elsewhere (and while
fine-tuning the signs) the codes are decoded into the incoherent weight Ŵ_r on the input's
device, in torch (no QuIP# CUDA kernel has been tested here). ``cache_weight()`` keeps the dense weight U_out^T Ŵ_r U_in instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import torch
from torch import nn

from casp.errors import CaspError
from casp.kernels.packed_matmul import FUSED_MAX_TOKENS, run_linear
from casp.kernels.quip_cpu import (NO_SECOND, SECOND_E8P, SECOND_TABLE, code_pairs, e8p_halves,
                                   quip_decode_rows, quip_matmul)
from casp.modules import register_module_type
from casp.quant.quip.codebooks import DIM, e81b_table
from casp.quant.quip.hadamard import base_matrix, decompose, pack_signs, transform, unpack_signs
from casp.quant.quip.quantize import QuIPResult, unrotate_weight
from casp.quant.quip.setting import QuIPSetting
from casp.quant.stored import StoredLinear


def to_int16(codes: torch.Tensor) -> torch.Tensor:
    """16-bit codes (0..65535, int64) as int16 two's complement."""
    c = codes.long() & 0xFFFF
    return torch.where(c >= 1 << 15, c - (1 << 16), c).to(torch.int16)


@dataclass
class QuIPKernelLayout:
    """What casp.kernels.quip_cpu reads: the E8P codes as table positions (``code_pairs``,
    int32 [G, out]: twice the stored codes' size, built once), those of an E8P residual
    stage or the codes of an E81B one [G, out], the stage kind, 1 / resid_scale and the scale, the E8P
    half-vectors, the E81B codebook and its transpose, and the sign vectors and transform
    factors around the kernel."""
    pairs: np.ndarray
    pairs2: np.ndarray
    codes2: np.ndarray
    second: int
    factor: float
    scale: float
    halves: np.ndarray
    book2: np.ndarray
    book2_t: np.ndarray
    s_in: np.ndarray
    s_out: np.ndarray
    s_in_t: torch.Tensor       # the same as tensors
    s_out_t: torch.Tensor
    transform_in: tuple        # (base [K, K], 2^m, 1 / sqrt(2^m)) of M_in
    transform_out: tuple       # the same for M_out^T




def _transform_factors(n: int, transpose: bool) -> tuple:
    """What casp.kernels.hadamard_cpu.transform_row takes for M (or M^T) of dimension n."""
    d = decompose(n)
    base = base_matrix(n).numpy()
    base = np.ascontiguousarray(base.T if transpose else base, dtype=np.float32)
    pw = 1 << d.log2_pow
    return base, pw, 1.0 / math.sqrt(pw)


@register_module_type
class QuIPLinear(StoredLinear):
    type_name = "quip"
    stored_tensors = ("codes", "resid_codes", "su", "sv", "scale")

    @staticmethod
    def described_bits(d: dict) -> int:
        return described_bits(d)

    def __init__(self, in_features: int, out_features: int, codebook: str = "e8p12",
                 bias: bool = False, real_signs: bool = False,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.setting = QuIPSetting.parse(codebook)
        self.setting.check(out_features, in_features)
        self.in_features, self.out_features = in_features, out_features
        groups = in_features // DIM
        self.register_buffer("codes", torch.zeros(out_features, groups, dtype=torch.int16,
                                                  device=device))
        if len(self.setting.stages) > 1:
            rdtype = torch.int16 if self.setting.stages[1] == "e8p" else torch.uint8
            self.register_buffer("resid_codes", torch.zeros(out_features, groups, dtype=rdtype,
                                                            device=device))
        else:
            self.resid_codes = None
        self.real_signs = real_signs
        if real_signs:
            self.register_buffer("su", torch.ones(in_features, dtype=torch.float16,
                                                  device=device))
            self.register_buffer("sv", torch.ones(out_features, dtype=torch.float16,
                                                  device=device))
        else:
            self.register_buffer("su", torch.zeros((in_features + 7) // 8, dtype=torch.uint8,
                                                   device=device))
            self.register_buffer("sv", torch.zeros((out_features + 7) // 8, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("scale", torch.ones(1, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self._train: list[nn.Parameter] | None = None

    @property
    def fp16_buffers(self) -> tuple[str, ...]:       # type: ignore[override]
        """Stored tensors dtype moves keep: the scale, and real-valued signs."""
        return ("su", "sv", "scale") if self.real_signs else ("scale",)

    @classmethod
    def from_result(cls, result: QuIPResult, bias: torch.Tensor | None,
                    dtype: torch.dtype) -> "QuIPLinear":
        out_f, groups = result.codes[0].shape
        module = cls(groups * DIM, out_f, result.setting.name, bias=bias is not None,
                     dtype=dtype, device=result.codes[0].device)
        with torch.no_grad():
            module.codes.copy_(to_int16(result.codes[0]))
            if module.resid_codes is not None:
                second = result.codes[1]
                module.resid_codes.copy_(to_int16(second) if module.resid_codes.dtype ==
                                         torch.int16 else second.to(torch.uint8))
            module.su.copy_(pack_signs(result.signs_in))
            module.sv.copy_(pack_signs(result.signs_out))
            module.scale.fill_(result.scale)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    # ------------------------------------------------------------------ decoding

    def signs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_in [in], s_out [out]) as float32."""
        if self._train is not None:
            return self._train[0], self._train[1]
        if self.real_signs:
            return self.su.float(), self.sv.float()
        return unpack_signs(self.su, self.in_features), unpack_signs(self.sv, self.out_features)

    def incoherent_weight(self) -> torch.Tensor:
        """Ŵ_r, float32 [out, in]: the codes through the codebook, times the scale."""
        codes = [self.codes] + ([self.resid_codes] if self.resid_codes is not None else [])
        values = self.setting.decode(codes)
        return values.reshape(self.out_features, self.in_features) * self.scale.float()

    def decode_weight(self) -> torch.Tensor:
        s_in, s_out = self.signs()
        return unrotate_weight(self.incoherent_weight(), s_in, s_out)

    def device_forward(self, x: torch.Tensor) -> torch.Tensor:
        s_in, s_out = self.signs()
        h = transform(x.float() * s_in)
        h = h @ self.incoherent_weight().T
        y = transform(h, transpose=True) * s_out
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def cpu_layout(self) -> QuIPKernelLayout:
        second, pairs2 = NO_SECOND, np.zeros((1, 1), np.int32)
        codes2, book2 = np.zeros((1, 1), np.uint8), np.zeros((1, 8), np.float32)
        if self.resid_codes is not None:
            if self.setting.stages[1] == "e8p":
                second, pairs2 = SECOND_E8P, code_pairs(self.resid_codes.numpy())
            else:
                second, codes2 = SECOND_TABLE, np.ascontiguousarray(self.resid_codes.numpy().T)
                book2 = e81b_table().numpy().astype(np.float32)
        s_in, s_out = self.signs()
        return QuIPKernelLayout(code_pairs(self.codes.numpy()), pairs2, codes2, second,
                                1.0 / self.setting.resid_scale, float(self.scale),
                                e8p_halves()[0], book2, np.ascontiguousarray(book2.T),
                                s_in.numpy().astype(np.float32), s_out.numpy().astype(np.float32),
                                s_in.float().clone(), s_out.float().clone(),
                                _transform_factors(self.in_features, False),
                                _transform_factors(self.out_features, True))

    def cpu_forward(self, x: torch.Tensor, layout: QuIPKernelLayout) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] <= FUSED_MAX_TOKENS:
            # one kernel call: transforms and product (casp.kernels.quip_cpu.quip_matmul)
            def fused(xs, ys):
                quip_matmul(xs, layout.s_in, *layout.transform_in, layout.halves, layout.pairs,
                            layout.pairs2, layout.codes2, layout.book2_t, layout.second,
                            layout.factor, layout.scale, *layout.transform_out, layout.s_out,
                            numba.get_num_threads(), ys)

            return run_linear(x, self.out_features, fused, None, self.bias)

        def tile(first, out):
            quip_decode_rows(layout.pairs, layout.halves, layout.pairs2, layout.codes2,
                             layout.book2, layout.second, layout.factor, layout.scale, first, out)

        # many rows: torch's batched transform (BLAS for the dense factor) around the tiles
        h = transform(flat.float() * layout.s_in_t)
        y = transform(run_linear(h, self.out_features, None, tile), transpose=True)
        y *= layout.s_out_t
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    # ------------------------------------------------------------------ fine-tuning

    def begin_training(self) -> list[nn.Parameter]:
        """Real-valued trainable copies of the sign vectors (QuIP#'s fine-tuning of S_U, S_V;
        codes fixed). Until :meth:`end_training` the forward pass uses them."""
        s_in, s_out = self.signs()
        self._train = [nn.Parameter(s_in.clone()), nn.Parameter(s_out.clone())]
        return self._train

    def end_training(self, keep: bool = True) -> None:
        """Store the trained vectors as float16 (the module then keeps real-valued signs), or
        drop them."""
        s_in, s_out = self._train
        self._train = None
        if keep:
            self.real_signs = True
            self.su = s_in.detach().half()
            self.sv = s_out.detach().half()
        if self._cached is not None:
            self._cached = None
            self.cache_weight()

    # ------------------------------------------------------------------ description

    def describe(self) -> dict:
        return {"type": self.type_name, "in_features": self.in_features,
                "out_features": self.out_features, "codebook": self.setting.name,
                "bits": self.setting.bits, "real_signs": self.real_signs,
                "transform_in": decompose(self.in_features).name,
                "transform_out": decompose(self.out_features).name,
                "bias": self.bias is not None}

    @classmethod
    def from_description(cls, d: dict, dtype: torch.dtype | None = None) -> "QuIPLinear":
        for key, n in (("transform_in", d["in_features"]), ("transform_out", d["out_features"])):
            if key in d and d[key] != decompose(n).name:
                raise CaspError(f"this checkpoint's QuIP# module used the transform {d[key]!r} "
                                f"for dimension {n}, this casp builds {decompose(n).name!r}: "
                                "it was written by another casp version")
        return cls(d["in_features"], d["out_features"], d["codebook"], bias=d.get("bias", False),
                   real_signs=d.get("real_signs", False), dtype=dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"codebook={self.setting.name}")


def described_bits(d: dict) -> int:
    """Stored bits of a QuIP# module from its description."""
    setting = QuIPSetting.parse(d["codebook"])
    bits = setting.cost(d["out_features"], d["in_features"])
    if d.get("real_signs"):                    # fp16 vectors instead of packed sign bits
        n_in, n_out = d["in_features"], d["out_features"]
        bits += 16 * (n_in + n_out) - 8 * (-(-n_in // 8) + -(-n_out // 8))
    return bits
