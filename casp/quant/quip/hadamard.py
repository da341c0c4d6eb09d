"""Fast orthogonal transforms for QuIP#'s incoherence processing.

A dimension n is written n = K * 2^m. The transform is the Kronecker product
M = (B / sqrt(K)) ⊗ (H_{2^m} / sqrt(2^m)), orthogonal, applied to a vector in
O(n log n + n K): a fast Walsh-Hadamard transform (Sylvester order) along the 2^m axis and a
small dense K x K matrix B along the other.

Which B (smallest K first):
- K = 1: n is a power of two, a pure Walsh-Hadamard transform.
- K a Hadamard order built here by Paley's constructions over a finite field GF(q),
  q a prime power: Paley I (q = 3 mod 4, order q + 1) and Paley II (q = 1 mod 4, order
  2(q + 1)). This covers 12, 20, 28, 36, 44, 60, 68, 72, 108, 344 and every other order
  these families reach. For the dimensions of the models here: 576 = 36 * 16,
  192 = 12 * 16, 1536 = 12 * 128, 4096 = 2^12, 11008 = 344 * 32 (Paley I over GF(7^3)),
  5120 = 20 * 256, 13824 = 108 * 128; low-rank ranks: 72 = 36 * 2, 40 = 20 * 2,
  512 = 2^9, 640 = 20 * 32.
- otherwise (no Hadamard of any order K * 2^j dividing n is constructible here, e.g. when
  n / 2^m is odd or 2 mod 4 after all powers of two): B is the orthonormal DCT-II matrix of
  order K = n / 2^m (m maximal). With QuIP#'s random signs on both sides this is a fast
  random orthogonal transform with entries of magnitude at most sqrt(2 / n): the same
  incoherence guarantee up to a factor sqrt(2).

On CUDA, when the ``fast_hadamard_transform`` package is installed, its kernel runs the
Walsh-Hadamard part; everywhere else a batched torch butterfly does.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

MAX_DENSE_ORDER = 4096      # largest K built or used as a dense factor


# ----------------------------------------------------------------------------- finite fields

def prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, p prime; None when q is not a prime power."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k, rest = 0, q
    while rest % p == 0:
        rest //= p
        k += 1
    return (p, k) if rest == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); coefficients lowest degree first, f monic."""
    a = list(a)
    while len(a) >= len(f):
        lead = a[-1] % p
        if lead:
            shift = len(a) - len(f)
            for i, c in enumerate(f):
                a[shift + i] = (a[shift + i] - lead * c) % p
        a.pop()
    return [c % p for c in a]


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree k over GF(p) (lowest degree first),
    found by trial division by every monic polynomial of degree 1..k/2."""
    def monic(deg):
        for low in itertools.product(range(p), repeat=deg):
            yield list(low) + [1]

    for f in monic(k):
        if all(any(_poly_mod(f, g, p)) for d in range(1, k // 2 + 1) for g in monic(d)):
            return f
    raise ValueError(f"no irreducible polynomial of degree {k} over GF({p})")   # cannot happen


def quadratic_character(q: int) -> tuple[np.ndarray, np.ndarray]:
    """For GF(q): the base-p digits of every element (row e = element e, its polynomial's
    coefficients) and chi(e): 0 for 0, 1 for a nonzero square, -1 otherwise."""
    p, k = prime_power(q)
    digits = np.array(list(itertools.product(range(p), repeat=k)), dtype=np.int64)[:, ::-1]
    chi = -np.ones(q, dtype=np.int64)
    chi[0] = 0
    f = _irreducible(p, k) if k > 1 else None
    powers = p ** np.arange(k)
    for e in range(1, q):
        a = list(digits[e])
        if f is None:
            square = [(a[0] * a[0]) % p]
        else:
            prod = [0] * (2 * k - 1)
            for i, x in enumerate(a):
                for j, y in enumerate(a):
                    prod[i + j] += x * y
            square = _poly_mod(prod, f, p)
        square = square + [0] * (k - len(square))
        chi[int(np.dot(square, powers))] = 1
    return digits, chi


def jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = chi(a - b) over GF(q)."""
    p, _ = prime_power(q)
    digits, chi = quadratic_character(q)
    powers = p ** np.arange(digits.shape[1])
    diff = (digits[:, None, :] - digits[None, :, :]) % p
    return chi[diff @ powers]


def paley_hadamard(order: int) -> np.ndarray | None:
    """A Hadamard matrix of ``order`` from Paley's construction I or II, or None."""
    q = order - 1
    pk = prime_power(q)
    if pk and q % 4 == 3:                                  # Paley I
        s = np.zeros((order, order), dtype=np.int64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = jacobsthal(q)
        return s + np.eye(order, dtype=np.int64)
    if order % 2 == 0:
        q = order // 2 - 1
        if prime_power(q) and q % 4 == 1:                  # Paley II
            c = np.zeros((q + 1, q + 1), dtype=np.int64)
            c[0, 1:] = 1
            c[1:, 0] = 1
            c[1:, 1:] = jacobsthal(q)
            plus = np.array([[1, 1], [1, -1]])
            zero = np.array([[1, -1], [-1, -1]])
            return np.kron(c, plus) + np.kron(np.eye(q + 1, dtype=np.int64), zero)
    return None


@lru_cache(maxsize=None)
def hadamard_matrix(order: int) -> np.ndarray | None:
    """A +-1 matrix H of ``order`` with H H^T = order I built by this module (1, 2, or a
    Paley order), checked; None when none is constructible here."""
    if order == 1:
        h = np.ones((1, 1), dtype=np.int64)
    elif order == 2:
        h = np.array([[1, 1], [1, -1]], dtype=np.int64)
    elif order % 4 or order > MAX_DENSE_ORDER:
        return None
    else:
        h = paley_hadamard(order)
        if h is None:
            return None
    if not np.array_equal(h @ h.T, order * np.eye(order, dtype=np.int64)):
        raise AssertionError(f"construction of a Hadamard matrix of order {order} failed")
    h.setflags(write=False)
    return h


def dct_matrix(order: int) -> np.ndarray:
    """The orthonormal DCT-II matrix of ``order`` (rows are the basis vectors)."""
    i = np.arange(order)
    m = np.cos(np.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * order))
    m[0] *= 1 / math.sqrt(2)
    return m * math.sqrt(2 / order)


# ----------------------------------------------------------------------------- transforms

def fwht_torch(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform (Sylvester order) along the last dimension,
    a power of two: log2(n) butterfly stages, each pairing the two halves of every block."""
    n = x.shape[-1]
    shape = x.shape
    y = x.reshape(-1, n)
    half = n // 2
    while half >= 1:
        y = y.view(y.shape[0], -1, 2, half)
        y = torch.cat((y[:, :, :1] + y[:, :, 1:], y[:, :, :1] - y[:, :, 1:]), dim=2)
        half //= 2
    return y.reshape(shape)


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)    # what the CUDA kernel takes


def _fast_kernel():
    try:
        from fast_hadamard_transform import hadamard_transform
    except ImportError:
        return None
    return hadamard_transform


def fwht(x: torch.Tensor, scale: float = 1.0, use_kernel: bool | None = None) -> torch.Tensor:
    """scale * Walsh-Hadamard transform along the last dimension (a power of two). On CUDA
    the ``fast_hadamard_transform`` kernel runs it when installed (``use_kernel`` None:
    whenever possible, i.e. for float32/float16/bfloat16 on CUDA; False: never)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"Walsh-Hadamard transform of length {n}: not a power of two")
    if n == 1:
        return x * scale
    if use_kernel is not False and x.is_cuda and x.dtype in KERNEL_DTYPES:
        kernel = _fast_kernel()
        if kernel is not None:
            return kernel(x.contiguous(), scale)
        if use_kernel:
            raise RuntimeError("fast_hadamard_transform is not installed")
    return fwht_torch(x) * scale


@dataclass(frozen=True)
class Decomposition:
    n: int
    base_order: int          # K
    log2_pow: int            # m
    kind: str                # "walsh" (K = 1), "hadamard" or "dct"

    @property
    def name(self) -> str:
        if self.kind == "walsh":
            return f"walsh-hadamard {self.n}"
        return f"{self.kind} {self.base_order} x walsh-hadamard {2 ** self.log2_pow}"


@lru_cache(maxsize=None)
def decompose(n: int) -> Decomposition:
    """How a dimension n is transformed (see the module docstring)."""
    if n < 1:
        raise ValueError(f"dimension {n} must be positive")
    twos = (n & -n).bit_length() - 1
    for m in range(twos, -1, -1):
        k = n >> m
        if k == 1:
            return Decomposition(n, 1, m, "walsh")
        if k > MAX_DENSE_ORDER:
            break
        if hadamard_matrix(k) is not None:
            return Decomposition(n, k, m, "hadamard")
    k = n >> twos
    if k > MAX_DENSE_ORDER:
        raise ValueError(f"dimension {n}: its odd part {k} is too large for a dense factor "
                         f"(at most {MAX_DENSE_ORDER})")
    return Decomposition(n, k, twos, "dct")


@lru_cache(maxsize=None)
def base_matrix(n: int) -> torch.Tensor:
    """The dense factor of M for dimension n, float64 [K, K] (orthogonal; [[1]] for K = 1)."""
    d = decompose(n)
    if d.kind == "hadamard":
        return torch.from_numpy(hadamard_matrix(d.base_order) / math.sqrt(d.base_order))
    if d.kind == "dct":
        return torch.from_numpy(dct_matrix(d.base_order))
    return torch.ones(1, 1, dtype=torch.float64)


@lru_cache(maxsize=256)
def _base_on(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return base_matrix(n).to(device, dtype)


def transform(x: torch.Tensor, transpose: bool = False, use_kernel: bool | None = None
              ) -> torch.Tensor:
    """M x (or M^T x) for every vector along the last dimension of ``x``; M is the
    orthogonal transform of that dimension. Computed in float32 (float64 for float64
    input), returned in x's dtype."""
    n = x.shape[-1]
    d = decompose(n)
    y = x if x.dtype == torch.float64 else x.float()
    pw = 1 << d.log2_pow
    if pw > 1:
        y = fwht(y.reshape(*x.shape[:-1], d.base_order, pw), 1 / math.sqrt(pw), use_kernel)
    else:
        y = y.reshape(*x.shape[:-1], d.base_order, 1)
    if d.base_order > 1:
        b = _base_on(n, y.device, y.dtype)
        y = torch.matmul(b.T if transpose else b, y)
    return y.reshape(x.shape).to(x.dtype)


def transform_matrix(n: int) -> torch.Tensor:
    """The explicit n x n matrix M (float64), for checks."""
    import scipy.linalg

    pw = 1 << decompose(n).log2_pow
    walsh = scipy.linalg.hadamard(pw) / math.sqrt(pw)          # Sylvester order, as fwht
    return torch.from_numpy(np.kron(base_matrix(n).numpy(), walsh))


# ----------------------------------------------------------------------------- random signs

def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    """n independent +-1 (float32)."""
    return torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """+-1 vector -> uint8 bits (1 = negative), 8 per byte, little-endian within a byte."""
    neg = (signs < 0).to(torch.uint8).cpu()
    pad = (-len(neg)) % 8
    neg = torch.cat([neg, torch.zeros(pad, dtype=torch.uint8)]).view(-1, 8)
    weights = (2 ** torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (neg * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: float32 +-1 of length n, on packed's device."""
    bits = (packed.to(torch.int32)[:, None] >> torch.arange(8, device=packed.device)) & 1
    return 1 - 2 * bits.reshape(-1)[:n].float()
