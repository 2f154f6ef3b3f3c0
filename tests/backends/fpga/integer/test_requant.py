"""Requantization int32 -> int8: dyadic and shift-only, both roundings, saturation."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from edgeq.backends.fpga.integer import Requantize, Rounding, emit_requantize, requantize_reference

INT32_EDGES = np.array([0, 1, -1, 2**31 - 1, -(2**31), 2**20, -(2**20), 127, -128, 12345, -12345], np.int32)


def _accumulators(rng: np.random.Generator) -> np.ndarray:
    wide = rng.integers(-(2**31), 2**31, 3000)
    narrow = rng.integers(-(2**14), 2**14, 3000)  # the realistic range: most outputs are in int8
    values = np.concatenate([INT32_EDGES, wide, narrow]).astype(np.int32)
    return values[: values.size // 7 * 7].reshape(-1, 7)  # 7 channels for the per-channel tests


@pytest.mark.parametrize("rounding", list(Rounding))
@pytest.mark.parametrize("in_scale, out_scale", [(0.00123, 2**-4), (3e-7, 2**-7), (0.9, 0.01), (2**-12, 2**-5)])
def test_dyadic_requant_bit_exact_and_accurate(run_kernel, rng, rounding, in_scale, out_scale) -> None:
    acc = _accumulators(rng)
    kernel = functools.partial(emit_requantize, out_scale=out_scale, rounding=rounding)
    got = run_kernel(kernel, acc=(acc, in_scale))
    assert np.array_equal(got, requantize_reference(acc, in_scale, out_scale, rounding=rounding))
    ideal = np.clip(acc.astype(np.float64) * in_scale / out_scale, -128, 127)
    # Half a step of rounding plus the 31-bit multiplier's relative error on |acc| <= 2^31.
    assert np.abs(got - ideal).max() <= 0.5 + 1e-6 * np.abs(ideal).max() + 1e-9


@pytest.mark.parametrize("rounding", list(Rounding))
def test_shift_only_requant_rounds_as_documented(run_kernel, rng, rounding) -> None:
    acc = _accumulators(rng)
    plan = Requantize.plan(2**-12, 2**-5, shift_only=True, rounding=rounding)
    assert plan.affine is not None and plan.affine.is_pure_shift and int(plan.affine.shift) == 7
    got = run_kernel(plan.emit, acc=(acc, 2**-12))
    assert np.array_equal(got, plan.reference(acc))
    exact = acc.astype(np.float64) / 2**7
    expected = np.round(exact) if rounding is Rounding.HALF_EVEN else np.floor(exact + 0.5)  # np.round: half-even
    assert np.array_equal(got, np.clip(expected, -128, 127))


def test_shift_only_left_shift_and_other_dtypes(run_kernel, rng) -> None:
    acc = np.array([[-300, -1, 0, 1, 100, 5000]], np.int32)
    got = run_kernel(functools.partial(emit_requantize, out_scale=2**-10, shift_only=True, out_dtype=np.int16),
                     acc=(acc, 2**-8))
    assert got.tolist() == [[-1200, -4, 0, 4, 400, 20000]]
    got = run_kernel(functools.partial(emit_requantize, out_scale=2**-2, shift_only=True, out_dtype=np.uint8),
                     acc=(acc, 2**-2))
    assert got.tolist() == [[0, 0, 0, 1, 100, 255]]


def test_per_channel_requant(run_kernel, rng) -> None:
    channel_scale = np.array([0.01, 0.5, 1.0, 0.003, 2.0, 0.07, 0.2])
    acc = _accumulators(rng)
    kernel = functools.partial(emit_requantize, out_scale=2**-4, channel_scale=channel_scale)
    got = run_kernel(kernel, acc=(acc, 1e-3))
    assert np.array_equal(got, requantize_reference(acc, 1e-3, 2**-4, channel_scale=channel_scale))
    ideal = np.clip(acc * 1e-3 * channel_scale / 2**-4, -128, 127)
    assert np.abs(got - ideal).max() <= 0.5 + 1e-5
    pow2_channels = np.array([1.0, 0.5, 0.25, 2.0, 1.0, 4.0, 0.125])
    plan = Requantize.plan(2**-10, 2**-4, shift_only=True, channel_scale=pow2_channels)
    assert plan.affine is not None and plan.affine.shift.tolist() == [6, 7, 8, 5, 6, 4, 9]
    assert np.array_equal(run_kernel(plan.emit, acc=(acc, 2**-10)), plan.reference(acc))
