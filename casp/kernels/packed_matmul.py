"""How a quantized linear multiplies on the CPU: a fused kernel from the packed codes for a
few tokens (decode), row tiles dequantized into a reused buffer and handed to the BLAS GEMM
for many (prefill), so memory stays bounded by one tile whatever the matrix.

A format supplies two numba kernels (casp.kernels.{gptq,quip,aqlm}_cpu): ``fused(x, y)``
writing y = x W^T for a float32 [T, in] input, and ``tile(first_row, out)`` writing rows of
the dequantized W. ``reference_path()`` turns the kernels off (every forward decodes the
whole weight, as before the kernels), for comparisons and debugging; so does the
environment variable CASP_KERNELS=0.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable

import torch

from casp.kernels.cpu_threads import sync_numba_threads

FUSED_MAX_TOKENS = 8          # up to this many rows of x the fused kernel runs; more: tiles
TILE_ELEMENTS = 1 << 20       # floats in one dequantization tile (4 MiB)

_state = threading.local()


def kernels_enabled() -> bool:
    if os.environ.get("CASP_KERNELS", "1") == "0":
        return False
    return not getattr(_state, "reference", False)


@contextlib.contextmanager
def reference_path():
    """Inside: quantized linears compute with their whole dequantized weight (no kernels)."""
    before = getattr(_state, "reference", False)
    _state.reference = True
    try:
        yield
    finally:
        _state.reference = before


def _tile_buffer(elements: int) -> torch.Tensor:
    """A float32 buffer of at least ``elements``, reused by every call on this thread."""
    buf = getattr(_state, "tile", None)
    if buf is None or buf.numel() < elements:
        buf = torch.empty(elements, dtype=torch.float32)
        _state.tile = buf
    return buf


def _tiled_matmul(x: torch.Tensor, out_features: int, tile: Callable[[int, object], None]
                  ) -> torch.Tensor:
    """y = x W^T, float32 [T, out], W decoded tile by tile into the reused buffer."""
    tokens, in_features = x.shape
    y = torch.empty(tokens, out_features, dtype=torch.float32)
    rows = max(1, min(out_features, TILE_ELEMENTS // max(1, in_features)))
    buf = _tile_buffer(rows * in_features)
    for first in range(0, out_features, rows):
        n = min(rows, out_features - first)
        w = buf[:n * in_features].view(n, in_features)
        tile(first, w.numpy())
        torch.matmul(x, w.T, out=y[:, first:first + n])
    return y


def run_linear(x: torch.Tensor, out_features: int, fused, tile,
               bias: torch.Tensor | None = None, columns: torch.Tensor | None = None
               ) -> torch.Tensor:
    """The whole CPU forward of a quantized linear: any leading shape and float dtype in,
    the same dtype out; the kernels compute in float32. ``fused(x, y)`` writes y = x W^T
    for a float32 [T, in] input of up to FUSED_MAX_TOKENS rows (numpy arrays; it takes
    the input features in their natural order), ``tile(first_row, out)`` writes rows of
    the dequantized W with its columns in the order ``columns`` (a permutation of the input
    features; None: the natural one)."""
    sync_numba_threads()
    flat = x.reshape(-1, x.shape[-1])
    if flat.dtype != torch.float32:
        flat = flat.float()
    if flat.shape[0] <= FUSED_MAX_TOKENS:
        flat = flat.contiguous()
        y = torch.empty(flat.shape[0], out_features, dtype=torch.float32)
        fused(flat.numpy(), y.numpy())
    else:
        if columns is not None:
            flat = flat.index_select(1, columns)
        y = _tiled_matmul(flat.contiguous(), out_features, tile)
    if bias is not None:
        y += bias
    y = y.view(*x.shape[:-1], out_features)
    return y if x.dtype == torch.float32 else y.to(x.dtype)
