"""Integer sigmoid and SiLU (i-exp and one rounding division): bit-exact, error measured."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from edgeq.backends.fpga.integer import Silu, emit_sigmoid, emit_silu, sigmoid_reference, silu_reference

# The approximation itself, measured with a 2^-30 sigmoid fraction: 7.8e-4 on sigmoid (the
# polynomial's 0.31% relative error times sigmoid' <= 1/4) and 7.1e-4 on SiLU. The int8 outputs
# add half a step.
SIGMOID_APPROX_ERROR = 8.5e-4
SILU_APPROX_ERROR = 8.5e-4


def _inputs(rng: np.random.Generator, in_scale: float) -> np.ndarray:
    real = np.concatenate([np.linspace(-24, 24, 4001), rng.normal(0, 4, 2000)])
    ints = np.clip(np.round(real / in_scale), -(2**31), 2**31 - 1)
    return np.concatenate([ints, [-(2**31), 2**31 - 1, 0, 1, -1]]).astype(np.int32)


@pytest.mark.parametrize("in_bits", [4, 12, 20])
@pytest.mark.parametrize("out_dtype", [np.uint8, np.int8])
def test_sigmoid(run_kernel, rng, in_bits: int, out_dtype) -> None:
    in_scale = 2.0**-in_bits
    x = _inputs(rng, in_scale)
    got = run_kernel(functools.partial(emit_sigmoid, out_dtype=out_dtype), x=(x, in_scale))
    assert np.array_equal(got, sigmoid_reference(x, in_scale, out_dtype=out_dtype))
    step = 2.0**-np.iinfo(out_dtype).bits if out_dtype == np.uint8 else 2.0**-7
    ideal = 1.0 / (1.0 + np.exp(-np.clip(x * in_scale, -500, 500)))
    representable = np.minimum(ideal, np.iinfo(out_dtype).max * step)  # 1.0 saturates one step below
    error = float(np.abs(got * step - representable).max())
    print(f"sigmoid in 2^-{in_bits} {np.dtype(out_dtype)}: max abs error {error:.5f} vs representable "
          f"(half step {step / 2:.5f}); {np.abs(got * step - ideal).max():.5f} vs float")
    assert error <= step / 2 + SIGMOID_APPROX_ERROR
    assert np.abs(got * step - ideal).max() <= step + SIGMOID_APPROX_ERROR


@pytest.mark.parametrize("in_bits", [4, 12, 20])
@pytest.mark.parametrize("out_bits", [3, 5, 7])
def test_silu(run_kernel, rng, in_bits: int, out_bits: int) -> None:
    in_scale, out_scale = 2.0**-in_bits, 2.0**-out_bits
    x = _inputs(rng, in_scale)
    got = run_kernel(functools.partial(emit_silu, out_scale=out_scale), x=(x, in_scale))
    assert np.array_equal(got, silu_reference(x, in_scale, out_scale=out_scale))
    real = np.clip(x * in_scale, -500, 500)  # beyond, SiLU is 0 or saturated anyway
    ideal = np.clip(real / (1.0 + np.exp(-real)), -128 * out_scale, 127 * out_scale)
    error = float(np.abs(got * out_scale - ideal).max())
    print(f"silu in 2^-{in_bits} out 2^-{out_bits}: max abs error {error:.5f} (half step {out_scale / 2:.5f})")
    assert error <= out_scale / 2 + SILU_APPROX_ERROR


def test_silu_pow2_scales_requantize_by_shift_only() -> None:
    assert Silu.plan(2.0**-8, 2.0**-4).requant.is_pure_shift
    assert not Silu.plan(3e-3, 2.0**-4).requant.is_pure_shift  # folded non-pow2 scale: dyadic


def test_sigmoid_symmetry(rng) -> None:
    x = rng.integers(-(2**20), 2**20, 5000).astype(np.int32)
    total = sigmoid_reference(x, 2**-12).astype(np.int64) + sigmoid_reference(-x, 2**-12).astype(np.int64)
    assert np.all(np.abs(total - 256) <= 1)  # sigmoid(x) + sigmoid(-x) = 1, up to rounding/saturation


@pytest.mark.parametrize("in_bits, out_bits", [(12, 10), (20, 14)])
def test_silu_int16_output(run_kernel, rng, in_bits: int, out_bits: int) -> None:
    """SwiGLU's 16-bit operand: the same kernel saturating to int16, bit-exact, half a step plus
    the approximation from float."""
    in_scale, out_scale = 2.0**-in_bits, 2.0**-out_bits
    x = _inputs(rng, in_scale)
    plan = Silu.plan(in_scale, out_scale, np.int16)
    got = run_kernel(plan.emit, x=(x, in_scale))
    assert got.dtype == np.int16 and np.array_equal(got, plan.reference(x))
    real = np.clip(x * in_scale, -500, 500)
    ideal = np.clip(real / (1.0 + np.exp(-real)), -32768 * out_scale, 32767 * out_scale)
    relative = np.abs(got * out_scale - ideal) / np.maximum(np.abs(ideal), 1.0)
    assert float(relative.max()) <= out_scale / 2 + 2 * SILU_APPROX_ERROR
    assert np.abs(got).max() > 127  # it uses the 16-bit range
