"""Integer LayerNorm and RMSNorm: bit-exact against the reference, error in output steps."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from edgeq.backends.fpga.integer import Normalization, emit_layernorm, emit_rmsnorm, layernorm_reference, rmsnorm_reference

OUT_BITS = 4
OUT_SCALE = 2.0**-OUT_BITS
# Half a step of final rounding plus what the integer datapath adds: every row keeps W >= 16
# significant bits whatever its magnitude, so the excess is ~1e-3 of a step (printed, -rP).
NORM_ERROR_STEPS = 0.51


def float_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray | None, eps: float, centered: bool) -> np.ndarray:
    centred = x - x.mean(-1, keepdims=True) if centered else x
    std = np.sqrt((centred * centred).mean(-1, keepdims=True) + eps)
    y = np.divide(centred, std, out=np.zeros_like(centred), where=std > 0)  # 0/0 (eps = 0) -> 0
    y = y * gamma + (0.0 if beta is None else beta)
    return np.clip(y, -128 * OUT_SCALE, 127 * OUT_SCALE)


def _emit(centered: bool, gamma: np.ndarray, beta: np.ndarray | None, eps: float):
    if centered:
        return functools.partial(emit_layernorm, gamma=gamma, beta=beta, out_scale=OUT_SCALE, eps=eps)
    return functools.partial(emit_rmsnorm, gamma=gamma, out_scale=OUT_SCALE, eps=eps)


def _reference(x: np.ndarray, scale: float, centered: bool, gamma, beta, eps) -> np.ndarray:
    if centered:
        return layernorm_reference(x, scale, gamma, beta, out_scale=OUT_SCALE, eps=eps)
    return rmsnorm_reference(x, scale, gamma, out_scale=OUT_SCALE, eps=eps)


def _check(run_kernel, x: np.ndarray, scale: float, centered: bool, gamma, beta, eps=1e-5) -> float:
    """Bit-exactness against the reference; returns the max error in output steps."""
    beta = beta if centered else None
    got = run_kernel(_emit(centered, gamma, beta, eps), x=(x, scale))
    assert np.array_equal(got, _reference(x, scale, centered, gamma, beta, eps))
    return float(np.abs(got * OUT_SCALE - float_norm(x * scale, gamma, beta, eps, centered)).max() / OUT_SCALE)


def _params(rng: np.random.Generator, channels: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(1.0, 0.3, channels), rng.normal(0.0, 0.5, channels)


def _activations(rng: np.random.Generator, rows: int, channels: int) -> np.ndarray:
    x = rng.normal(0.2, 1.5, (rows, channels))
    x[:, :3] *= 25.0  # outlier channels, as in real residual streams
    return x


NAMES = {True: "layernorm", False: "rmsnorm"}


@pytest.mark.parametrize("centered", [True, False], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("channels", [64, 384, 768, 4096])
def test_int8_input(run_kernel, rng, centered: bool, channels: int) -> None:
    gamma, beta = _params(rng, channels)
    real = _activations(rng, 8, channels)
    scale = 2.0**-2
    x = np.clip(np.round(real / scale), -128, 127).astype(np.int8)
    error = _check(run_kernel, x, scale, centered, gamma, beta)
    print(f"{NAMES[centered]} int8 N={channels}: max error {error:.5f} steps of {OUT_SCALE}")
    assert error <= NORM_ERROR_STEPS


@pytest.mark.parametrize("centered", [True, False], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("magnitude_bits", [4, 12, 23, 30])
def test_int32_input_of_any_magnitude(run_kernel, rng, centered: bool, magnitude_bits: int) -> None:
    """Rows using 4 to 30 bits of an int32 all keep full precision (per-row block scaling)."""
    channels = 768
    gamma, beta = _params(rng, channels)
    real = _activations(rng, 6, channels)
    x = np.round(real / np.abs(real).max() * 2.0 ** (magnitude_bits - 1)).astype(np.int32)
    scale = 2.0**-16
    eps = 1e-5 * (scale * 2.0 ** (magnitude_bits - 10)) ** 2  # keep eps small against this row's variance
    error = _check(run_kernel, x, scale, centered, gamma, beta, eps=eps)
    print(f"{NAMES[centered]} int32 |x| < 2^{magnitude_bits - 1}: max error {error:.5f} steps")
    assert error <= NORM_ERROR_STEPS


@pytest.mark.parametrize("centered", [True, False], ids=["layernorm", "rmsnorm"])
def test_edge_rows(run_kernel, rng, centered: bool) -> None:
    channels = 16
    gamma, beta = _params(rng, channels)
    rows = np.array([
        [5] * channels,                                   # all equal: LayerNorm gives beta
        [0] * channels,                                   # all zero: eps only
        [2**31 - 1] * 8 + [-(2**31)] * 8,                 # extremes
        [-(2**31)] * channels,
        [2**31 - 1] + [0] * (channels - 1),               # one spike
        list(range(-8, 8)),                               # tiny spread, half-integer mean
        [1] + [0] * (channels - 1),
    ], np.int32)
    for scale, eps in ((2.0**-16, 1e-5), (2.0**-4, 1e-6), (2.0**-20, 0.0), (2.0**-30, 1e-6)):
        error = _check(run_kernel, rows, scale, centered, gamma, beta, eps=eps)
        print(f"{NAMES[centered]} edge rows, scale {scale:.3g}, eps {eps}: max error {error:.5f} steps")
        assert error <= NORM_ERROR_STEPS
    x8 = np.array([[127] * channels, [-128] * channels, [-128, 127] * (channels // 2), [0] * channels], np.int8)
    assert _check(run_kernel, x8, 2.0**-3, centered, gamma, beta) <= NORM_ERROR_STEPS
    if centered:
        equal_row = layernorm_reference(rows[:1], 2.0**-16, gamma, beta, out_scale=OUT_SCALE)[0]
        assert np.array_equal(equal_row, np.clip(np.round(beta / OUT_SCALE), -128, 127))


def test_block_scaling_constants() -> None:
    plan = Normalization.plan(centered=True, in_scale=2**-3, in_dtype=np.int8, gamma=np.ones(768), beta=None,
                              eps=1e-5, out_scale=OUT_SCALE)
    # N * 2^2W <= 2^61 with N = 768 (10 bits): W = 25 significant bits per row.
    assert plan.work_bits == 25 and not plan.affine.is_pure_shift
    assert 2**30 <= plan.eps_mantissa <= 2**31
