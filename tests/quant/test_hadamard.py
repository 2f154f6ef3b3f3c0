"""edgeq.quant.hadamard: Sylvester, Paley I/II (prime and prime-power fields) and Kronecker products
give Hadamard matrices (entries +-1, H H^T = n I), and `Rotation` applies them exactly."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.quant import hadamard
from edgeq.quant.hadamard import HadamardOrderError, Rotation

# The orders the issue names: n = m * 2^k for these m, up to 4096.
ISSUE_BASES = (1, 12, 20, 28, 36, 40)
ISSUE_ORDERS = sorted({m << k for m in ISSUE_BASES for k in range(13) if 2 <= m << k <= 4096})


def _exact_hadamard(h: np.ndarray) -> bool:
    n = h.shape[0]
    if not np.isin(h, (-1, 1)).all():
        return False
    hf = h.astype(np.float64)  # integer products, exact in float64 below 2^53
    if n <= 512:
        return np.array_equal(hf @ hf.T, n * np.eye(n))
    # Freivalds: H (H^T v) = n v for random integer v; a non-Hadamard passes with odds ~1e-9
    v = np.random.default_rng(n).integers(-1000, 1000, size=(n, 3)).astype(np.float64)
    return np.array_equal(hf @ (hf.T @ v), n * v)


def test_every_base_construction_up_to_512_is_hadamard():
    orders = [n for n in range(1, 513) if hadamard.base_construction(n)]
    assert {12, 20, 24, 28, 36, 44, 52, 60} <= set(orders)
    for n in orders:
        assert _exact_hadamard(hadamard.base_hadamard(n)), (n, hadamard.base_construction(n))


@pytest.mark.parametrize("n, how", [(12, "paley1 q=11"), (20, "paley1 q=19"), (28, "paley1 q=27"),
                                    (36, "paley2 q=17"), (52, "paley2 q=25"), (244, "paley1 q=243"),
                                    (1332, "paley1 q=1331")])
def test_paley_over_prime_and_prime_power_fields(n, how):
    assert hadamard.base_construction(n) == how
    assert _exact_hadamard(hadamard.base_hadamard(n))


@pytest.mark.parametrize("n", ISSUE_ORDERS)
def test_orders_m_times_power_of_two_up_to_4096(n):
    factors = hadamard.hadamard_factors(n)
    assert int(np.prod([f.shape[0] for f in factors])) == n
    for f in factors:
        assert _exact_hadamard(f)
    rotation = Rotation(tuple(factors))
    x = np.random.default_rng(n).standard_normal((4, n))
    y = rotation.apply(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-12)
    np.testing.assert_allclose(rotation.apply(y, transpose=True), x, atol=1e-12)
    if n <= 2048:  # the dense matrix itself: H H^T = I, entries +-1/sqrt(n)
        h = hadamard.hadamard(n)
        np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
        np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=1e-12)


@pytest.mark.parametrize("n, factors", [(384, (12, 32)), (576, (36, 16)), (1536, (12, 128)),
                                        (64, (64,)), (2304, (36, 64))])
def test_model_sizes(n, factors):
    """MiniLM hidden 384 and FFN 1536, SmolLM2 hidden 576 and FFN 1536."""
    assert hadamard.factor_orders(n) == factors
    h = hadamard.hadamard(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    x = np.random.default_rng(0).standard_normal((3, n))
    np.testing.assert_allclose(Rotation.of_order(n).apply(x), x @ h, atol=1e-12)


def test_all_supported_orders_up_to_4096_are_orthogonal():
    rng = np.random.default_rng(1)
    checked = 0
    for n in range(4, 4097, 4):
        if not hadamard.is_supported(n):
            continue
        orders = hadamard.factor_orders(n)
        assert int(np.prod(orders)) == n and all(hadamard.base_construction(o) for o in orders)
        if n > 512:   # the base factors are checked exactly above; here their composition
            continue
        rotation = Rotation(tuple(hadamard.hadamard_factors(n)))
        x = rng.standard_normal((2, n))
        np.testing.assert_allclose(rotation.apply(rotation.apply(x), transpose=True), x, atol=1e-11)
        checked += 1
    assert checked > 100


@pytest.mark.parametrize("n", [0, 3, 6, 92, 116, 4 * 1019])
def test_unsupported_orders_raise(n):
    with pytest.raises(HadamardOrderError):
        hadamard.hadamard_factors(n)
    assert not hadamard.is_supported(n)


def test_rotation_with_signs_and_blocks_is_orthogonal_and_matches_dense():
    rotation = Rotation.of_order(12, blocks=3, seed=7)
    q = rotation.dense()
    np.testing.assert_allclose(q @ q.T, np.eye(36), atol=1e-12)
    h = hadamard.hadamard(12)
    expected = np.diag(rotation.signs) @ np.kron(np.eye(3), h)
    np.testing.assert_allclose(q, expected, atol=1e-12)
    w = np.random.default_rng(0).standard_normal((36, 5))
    np.testing.assert_allclose(rotation.apply(w, axis=0), q.T @ w, atol=1e-12)     # Q^T W
    np.testing.assert_allclose(rotation.apply(w.T, axis=1), w.T @ q, atol=1e-12)   # W Q
    np.testing.assert_allclose(rotation.apply(w.T, axis=1, transpose=True), w.T @ q.T, atol=1e-12)


def test_last_axis_form_is_the_kronecker_product_with_cycled_axes():
    """What `Reshape -> (Einsum last axis, Transpose last to front)* -> Einsum -> Reshape`
    computes: x kron(F1..Fk) followed by the permutation of the cycled layout [f2..fk, f1]."""
    rotation = Rotation.of_order(12 * 4 * 2, max_factor=4)   # factors 12, 4, 2
    assert [f.shape[0] for f in rotation.factors] == [12, 4, 2]
    permuted = rotation.last_axis_form()
    x = np.random.default_rng(0).standard_normal((5, 96))
    z = x.reshape(5, 12, 4, 2)
    for f in reversed(rotation.normalised_factors(np.float64)):   # contract last, move it first
        z = np.moveaxis(np.tensordot(z, f, axes=([3], [0])), 3, 1)
    z = np.moveaxis(z, 1, 3)                                       # no transpose after the last one
    np.testing.assert_allclose(permuted.apply(x), z.reshape(5, 96), atol=1e-12)
    q = permuted.dense()
    np.testing.assert_allclose(q @ q.T, np.eye(96), atol=1e-12)
    np.testing.assert_allclose(permuted.apply(x, transpose=True), x @ q.T, atol=1e-12)


@pytest.mark.parametrize("n", [12, 96, 576, 1536])
def test_dense_and_kronecker_application_agree(n, monkeypatch):
    rotation = Rotation.of_order(n, seed=1, max_factor=4 if n == 96 else 128).last_axis_form()
    x = np.random.default_rng(0).standard_normal((5, n))
    dense = [rotation.apply(x), rotation.apply(x, transpose=True), rotation.apply(x.T, 0)]
    monkeypatch.setattr(hadamard, "DENSE_LIMIT", 0)
    structured = [rotation.apply(x), rotation.apply(x, transpose=True), rotation.apply(x.T, 0)]
    for a, b in zip(dense, structured):
        np.testing.assert_allclose(a, b, atol=1e-12)
    assert rotation.apply(x.astype(np.float32)).dtype == np.float32
