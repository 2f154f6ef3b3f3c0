"""Hadamard matrices of order n = 2^k * b, as Kronecker products of small factors.

A Hadamard matrix H of order n has entries +-1 and H H^T = n I; H / sqrt(n) is orthogonal.
Orders other than 1 and 2 are multiples of 4. The constructions here are classical:

- Sylvester: H_2 = [[1, 1], [1, -1]], H_{2^k} = H_2 (x) ... (x) H_2.
- Paley I:  q a prime power, q = 3 (mod 4): order q + 1, from the Jacobsthal matrix of GF(q)
  (Q[a, b] = chi(a - b), chi the quadratic character): H = I + [[0, 1^T], [-1, Q]].
- Paley II: q a prime power, q = 1 (mod 4): order 2(q + 1): C = [[0, 1^T], [1, Q]] (symmetric),
  H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]].
- Kronecker products: A (x) B is Hadamard when A and B are.

`hadamard_factors(n)` picks the smallest base order b = m * 2^j (m the odd part of n) that Paley
I/II (or Sylvester) construct and returns [H_b, H_{2^(n/b)} ...]: e.g. 576 = 36 (x) 16 (Paley II,
q = 17), 384 = 12 (x) 32 (Paley I, q = 11), 1536 = 12 (x) 128. GF(p^k) for prime powers is built
from a primitive polynomial found by search, whose discrete-log table gives the quadratic
character directly (squares are the even powers of the generator).

`Rotation` is the orthogonal matrix Q = diag(signs) (I_blocks (x) H_n / sqrt(n)) applied along one
axis of an array in its Kronecker form (never as a dense n x n product unless asked), which is
how passes fold rotations into weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from edgeq.errors import EdgeqError


class HadamardOrderError(EdgeqError):
    """No Hadamard matrix of this order can be constructed here."""


# ---- finite fields -------------------------------------------------------------------------


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, p prime, k >= 1; None otherwise."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k, rest = 0, q
    while rest % p == 0:
        rest //= p
        k += 1
    return (p, k) if rest == 1 else None


@lru_cache(maxsize=64)
def _quadratic_character(q: int) -> tuple[np.ndarray, np.ndarray]:
    """(digits, chi) of GF(q), q = p^k odd: element e <-> base-p digits digits[e] (length k,
    least significant first; e = sum digits * p^i), chi[e] in {0, 1, -1}."""
    p, k = _prime_power(q)  # type: ignore[misc]
    log_parity = _log_parity(p, k)
    digits = (np.arange(q, dtype=np.int64)[:, None] // p ** np.arange(k)) % p
    chi = np.zeros(q, dtype=np.int8)
    nonzero = log_parity >= 0
    chi[nonzero] = np.where(log_parity[nonzero] == 0, 1, -1)
    return digits, chi


def _log_parity(p: int, k: int) -> np.ndarray:
    """Parity of the discrete log of every element of GF(p^k) (-1 for 0), from a primitive
    polynomial found by search: x has order p^k - 1 in GF(p)[x]/(f), so the quotient is a field
    (every nonzero element is a power of x, hence a unit) and x generates its unit group."""
    q = p**k
    if k == 1:
        for g in range(2, p) if p > 2 else [1]:
            parity = np.full(q, -1, dtype=np.int64)
            e, seen = 1, 0
            for i in range(q - 1):
                if parity[e] >= 0:
                    break
                parity[e] = i % 2
                seen += 1
                e = e * g % p
            if seen == q - 1:
                return parity
        raise AssertionError(f"no primitive root mod {p}")
    weights = p ** np.arange(k)
    # f = x^k + c_{k-1} x^{k-1} + ... + c_0; reducing x^k gives -c.
    for coeffs in np.ndindex(*([p] * k)):
        c = np.array(coeffs, dtype=np.int64)
        if c[0] == 0:
            continue
        parity = np.full(q, -1, dtype=np.int64)
        poly = np.zeros(k, dtype=np.int64)
        poly[0] = 1
        ok = True
        for i in range(q - 1):
            e = int(poly @ weights)
            if parity[e] >= 0:
                ok = False
                break
            parity[e] = i % 2
            top = poly[-1]
            poly = np.concatenate(([0], poly[:-1]))
            poly = (poly - top * c) % p
        if ok and int(poly @ weights) == 1:
            return parity
    raise AssertionError(f"no primitive polynomial of degree {k} over GF({p})")


def _jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = chi(a - b) over GF(q), int8 [q, q]."""
    digits, chi = _quadratic_character(q)
    p, k = _prime_power(q)  # type: ignore[misc]
    if k == 1:  # GF(p): a - b mod p
        index = np.arange(q, dtype=np.int32)
        return chi[(index[:, None] - index[None, :]) % q]
    diff = np.zeros((q, q), dtype=np.int32)
    for i in range(k):  # digit-wise subtraction mod p
        d = digits[:, i].astype(np.int32)
        diff += ((d[:, None] - d[None, :]) % p) * p**i
    return chi[diff]


# ---- base constructions --------------------------------------------------------------------


def sylvester(order: int) -> np.ndarray:
    """Sylvester's Hadamard matrix of order 2^k (int8 +-1)."""
    if order < 1 or order & (order - 1):
        raise HadamardOrderError(f"Sylvester's construction needs a power of two, not {order}")
    h = np.ones((1, 1), dtype=np.int8)
    h2 = np.array([[1, 1], [1, -1]], dtype=np.int8)
    while h.shape[0] < order:
        h = np.kron(h, h2)
    return h


def paley1(q: int) -> np.ndarray:
    """Paley I: order q + 1 for a prime power q = 3 (mod 4)."""
    if _prime_power(q) is None or q % 4 != 3:
        raise HadamardOrderError(f"Paley I needs a prime power q = 3 mod 4, not {q}")
    jac = _jacobsthal(q)
    s = np.zeros((q + 1, q + 1), dtype=np.int8)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jac
    return (s + np.eye(q + 1, dtype=np.int8)).astype(np.int8)


def paley2(q: int) -> np.ndarray:
    """Paley II: order 2(q + 1) for a prime power q = 1 (mod 4)."""
    if _prime_power(q) is None or q % 4 != 1:
        raise HadamardOrderError(f"Paley II needs a prime power q = 1 mod 4, not {q}")
    jac = _jacobsthal(q)
    c = np.zeros((q + 1, q + 1), dtype=np.int8)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = jac
    zero_block = np.array([[1, -1], [-1, -1]], dtype=np.int8)
    one_block = np.array([[1, 1], [1, -1]], dtype=np.int8)
    return (np.kron(c, one_block) + np.kron(np.eye(q + 1, dtype=np.int8), zero_block)).astype(np.int8)


def base_construction(order: int) -> str | None:
    """How a base matrix of exactly this order is built: 'sylvester', 'paley1 q=..',
    'paley2 q=..', or None."""
    if order >= 1 and order & (order - 1) == 0:
        return "sylvester"
    if order % 4:
        return None
    pp = _prime_power(order - 1)
    if pp is not None and (order - 1) % 4 == 3:
        return f"paley1 q={order - 1}"
    pp = _prime_power(order // 2 - 1)
    if pp is not None and (order // 2 - 1) % 4 == 1:
        return f"paley2 q={order // 2 - 1}"
    return None


@lru_cache(maxsize=64)
def _base(order: int) -> np.ndarray:
    how = base_construction(order)
    if how is None:
        raise HadamardOrderError(f"no base construction for order {order}")
    if how == "sylvester":
        h = sylvester(order)
    elif how.startswith("paley1"):
        h = paley1(order - 1)
    else:
        h = paley2(order // 2 - 1)
    h.setflags(write=False)
    return h


def base_hadamard(order: int) -> np.ndarray:
    """The base (non-Kronecker) matrix of this order (int8 +-1, read-only)."""
    return _base(order)


# ---- any supported order -------------------------------------------------------------------


def factor_orders(n: int, max_factor: int = 128) -> tuple[int, ...]:
    """Orders of the Kronecker factors of the Hadamard matrix of order n: the smallest
    constructible base m * 2^j (m the odd part of n), then Sylvester factors of at most
    `max_factor` (a power of two) for the rest. Raises HadamardOrderError if unsupported."""
    if n < 1:
        raise HadamardOrderError(f"no Hadamard matrix of order {n}")
    if n in (1, 2):
        return (n,)
    if n % 4:
        raise HadamardOrderError(f"no Hadamard matrix of order {n}: orders above 2 are multiples of 4")
    twos = (n & -n).bit_length() - 1
    odd = n >> twos
    for j in range(twos + 1):
        base = odd << j
        if odd > 1 and base_construction(base) is None:
            continue
        rest = n // base if odd > 1 else n
        factors: list[int] = [base] if odd > 1 else []
        while rest > 1:
            piece = min(rest, max_factor)
            factors.append(piece)
            rest //= piece
        return tuple(factors)
    raise HadamardOrderError(
        f"no Hadamard matrix of order {n} = 2^{twos} * {odd} here: no Paley I/II or Sylvester base "
        f"of order {odd} * 2^j", fix="supported: 2^k times a Paley order (q+1 or 2(q+1), q a prime power)")


def is_supported(n: int) -> bool:
    try:
        factor_orders(n)
    except HadamardOrderError:
        return False
    return True


def hadamard_factors(n: int, max_factor: int = 128) -> list[np.ndarray]:
    """+-1 matrices whose Kronecker product (in order) is a Hadamard matrix of order n."""
    return [_base(f) for f in factor_orders(n, max_factor)]


def hadamard(n: int, dtype=np.float64) -> np.ndarray:
    """The normalised (orthogonal) dense Hadamard matrix of order n: kron(factors) / sqrt(n)."""
    h = np.ones((1, 1), dtype=np.float64)
    for f in hadamard_factors(n):
        h = np.kron(h, f.astype(np.float64))
    return (h / math.sqrt(n)).astype(dtype)


# ---- applying a rotation along an axis -----------------------------------------------------


DENSE_LIMIT = 2048   # Rotation.apply multiplies by the dense block up to this order


@dataclass(frozen=True)
class Rotation:
    """Q = diag(signs) @ (I_blocks (x) H P) with H = kron(factors) / sqrt(prod(factors)) and P
    an optional permutation of each block's outputs ((x H P)[j] = (x H)[perm[j]]): an
    orthogonal matrix of order blocks * prod(factors). `apply(x, axis)` computes x @ Q along
    `axis` (the axis plays the role of the row vector), `apply(x, axis, transpose=True)`
    x @ Q^T. For a weight W [in, out]: Q^T W = apply(W, 0) and W Q = apply(W, 1)."""

    factors: tuple[np.ndarray, ...]
    blocks: int = 1
    signs: np.ndarray | None = None
    perm: np.ndarray | None = None

    def last_axis_form(self) -> "Rotation":
        """The same Kronecker factors with the output permutation that applying them by
        contracting only last axes produces: x [.., f1..fk] -> contract fk, move it first, ...,
        contract f1 (no final transpose) leaves the axes as [f2, .., fk, f1]."""
        orders = [f.shape[0] for f in self.factors]
        if len(orders) == 1:
            return self
        index = np.arange(self.block_order).reshape(orders)
        return Rotation(self.factors, self.blocks, self.signs, np.moveaxis(index, 0, -1).ravel())

    @classmethod
    def of_order(cls, n: int, *, blocks: int = 1, seed: int | None = None,
                 max_factor: int = 128) -> "Rotation":
        """The Hadamard rotation of order n (repeated over `blocks` diagonal blocks); with a
        seed, random signs on the rows (a randomized Hadamard, QuaRot's choice)."""
        factors = tuple(hadamard_factors(n, max_factor))
        signs = None
        if seed is not None:
            signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=n * blocks)
        return cls(factors, blocks, signs)

    @property
    def block_order(self) -> int:
        return int(np.prod([f.shape[0] for f in self.factors]))

    @property
    def order(self) -> int:
        return self.blocks * self.block_order

    def normalised_factors(self, dtype=np.float32) -> list[np.ndarray]:
        """Each factor divided by sqrt(its order), so their Kronecker product is orthogonal."""
        return [(f.astype(np.float64) / math.sqrt(f.shape[0])).astype(dtype) for f in self.factors]

    def block_matrix(self, dtype=np.float64) -> np.ndarray:
        """H P of one block, dense (cached per dtype)."""
        cache = self.__dict__.setdefault("_dense", {})
        key = np.dtype(dtype).str
        if key not in cache:
            h = np.ones((1, 1))
            for f in self.normalised_factors(np.float64):
                h = np.kron(h, f)
            if self.perm is not None:
                h = h[:, self.perm]
            cache[key] = np.ascontiguousarray(h, dtype=dtype)
        return cache[key]

    def apply(self, x: np.ndarray, axis: int = -1, *, transpose: bool = False) -> np.ndarray:
        """x @ Q (or x @ Q^T) along `axis`; float32 in float32 out, anything else in float64.
        Orders up to DENSE_LIMIT multiply by the cached dense block (BLAS), larger ones contract
        the Kronecker factors one axis at a time."""
        dtype = np.float32 if np.asarray(x).dtype == np.float32 else np.float64
        x = np.asarray(x, dtype=dtype)
        axis = axis % x.ndim
        if x.shape[axis] != self.order:
            raise ValueError(f"axis {axis} has {x.shape[axis]} entries, the rotation has order {self.order}")
        moved = np.moveaxis(x, axis, -1)
        lead = moved.shape[:-1]
        if not transpose and self.signs is not None:
            moved = moved * self.signs.astype(dtype)
        if self.block_order <= DENSE_LIMIT:
            block = self.block_matrix(dtype)
            # one 2-D GEMM (a [.., 1, n] @ [n, n] batch would run row by row)
            y = np.ascontiguousarray(moved).reshape(-1, self.block_order) @ (block.T if transpose else block)
            y = y.reshape(*lead, self.order)
            if transpose and self.signs is not None:
                y = y * self.signs.astype(dtype)
            return np.moveaxis(y, -1, axis)
        orders = [f.shape[0] for f in self.factors]
        if transpose and self.perm is not None:   # x P^T first
            moved = moved.reshape(*lead, self.blocks, self.block_order)[..., np.argsort(self.perm)]
        y = moved.reshape(*lead, self.blocks, *orders)
        k = len(orders)
        for i, f in enumerate(self.normalised_factors(dtype)):
            mat = f.T if transpose else f
            # contract axis (-k + i) with the factor's first index; result lands at the end
            y = np.moveaxis(np.tensordot(y, mat, axes=([y.ndim - k + i], [0])), -1, y.ndim - k + i)
        if not transpose and self.perm is not None:
            y = y.reshape(*lead, self.blocks, self.block_order)[..., self.perm]
        y = y.reshape(*lead, self.order)
        if transpose and self.signs is not None:
            y = y * self.signs.astype(dtype)
        return np.moveaxis(y, -1, axis)

    def dense(self) -> np.ndarray:
        """Q as a dense float64 matrix (for tests and small orders)."""
        return self.apply(np.eye(self.order), axis=-1)
