"""The weight-rounding math on its own: GPTQ's column-by-column rounding against a Hessian
(static act-order groups, identity Hessian = round to nearest, dead channels) and the clip /
signed-scale search, and the least-squares refit of scales for fixed codes, on random matrices."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.quant.numerics import quantize_weight
from edgeq.quant.rounding import (CLIP_RATIOS, REFIT_RANGE, dequantize_kn, gptq_quantize, output_errors,
                                  quantize_kn, refit_scales, search_params)
from edgeq.targets.base import Granularity, QSpec

INT4_G32 = QSpec("int4", symmetric=True, granularity=Granularity.BLOCK, axis=0, block_size=32)
INT4_G128 = INT4_G32.replace(block_size=128)
INT8_CHANNEL = QSpec("int8", symmetric=True, granularity=Granularity.CHANNEL)


@pytest.mark.parametrize("ratios", [(1.0,), CLIP_RATIOS])
def test_act_order_groups_are_static_and_contiguous(ratios):
    """With act-order the rows are rounded by decreasing H_kk, but each block's scale is the
    one of the original weight's contiguous block (what DequantizeLinear reads)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((512, 96)).astype(np.float32) * rng.uniform(0.1, 5, 96).astype(np.float32)
    h = 2 * x.T.astype(np.float64) @ x / len(x)
    w = rng.standard_normal((96, 20)).astype(np.float32)
    q, scale, zero = gptq_quantize(w, h, INT4_G32, act_order=True, clip_ratios=ratios)
    assert scale.shape == (3, 20)
    for b in range(3):
        rows = slice(32 * b, 32 * (b + 1))
        expected, _ = search_params(w[rows], np.diag(h)[rows].astype(np.float32), INT4_G32, ratios)
        np.testing.assert_array_equal(scale[b], expected)
    plain = gptq_quantize(w, h, INT4_G32, clip_ratios=ratios)
    assert not np.array_equal(q, plain[0])
    error = output_errors(h, w, dequantize_kn(q, scale, zero, INT4_G32),
                          dequantize_kn(*quantize_kn(w, INT4_G32), INT4_G32))
    assert error[0] < error[1]


@pytest.mark.parametrize("spec", [INT4_G32, INT4_G128.replace(block_size=64), INT8_CHANNEL,
                                  QSpec("uint4", symmetric=False, granularity=Granularity.BLOCK, axis=0,
                                        block_size=32)])
def test_gptq_with_an_identity_hessian_is_round_to_nearest(spec):
    """No correlation between inputs: nothing to compensate, so GPTQ rounds exactly as
    quantize_weight does (same scales, same integers), including a partial last block."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96 + 16, 40)).astype(np.float32)
    q, scale, zero = gptq_quantize(w, np.eye(len(w)), spec, damp=0.01)
    rq, rscale, rzero = quantize_weight(w, spec.replace(axis=0) if spec.block_size else spec, channel_axis=1)
    np.testing.assert_array_equal(q, rq)
    np.testing.assert_array_equal(scale, rscale)
    np.testing.assert_array_equal(zero, rzero)


def test_dead_input_channels_keep_their_rounded_weights():
    """A channel that is always 0 spreads no error and receives none: its row is rounded to
    nearest, with the block's scale from the original weight."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    x[:, 5] = 0.0
    w = rng.standard_normal((64, 24)).astype(np.float32)
    q, scale, zero = gptq_quantize(w, 2 * x.T.astype(np.float64) @ x / len(x), INT4_G32)
    rq, rscale, _ = quantize_kn(w, INT4_G32)
    np.testing.assert_array_equal(q[5], rq[5])
    np.testing.assert_array_equal(scale[0], rscale[0])
    assert not np.array_equal(q[6:32], rq[6:32])  # the live rows were compensated


def test_signed_scale_search_is_never_worse_than_positive_scales():
    rng = np.random.default_rng(3)
    part = rng.standard_normal((128, 64)).astype(np.float32)
    weights = rng.uniform(0.1, 2.0, 128).astype(np.float32)
    errors = []
    for full in (False, True):
        scale, zero = search_params(part, weights, INT4_G128, CLIP_RATIOS, full)
        q = np.clip(np.round(part / scale), -8, 7)
        errors.append(float(weights @ ((part - q * scale) ** 2) @ np.ones(64)))
    assert errors[1] <= errors[0] * (1 + 1e-6)


def _correlated_hessian(rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = np.eye(rows) + 0.3 * rng.standard_normal((rows, rows)) / np.sqrt(rows)
    x = (rng.standard_normal((2048, rows)) * rng.uniform(0.2, 4, rows)) @ mix
    return (2 * x.T @ x / len(x)).astype(np.float32)


@pytest.mark.parametrize("spec", [INT4_G32, INT4_G128, INT8_CHANNEL,
                                  QSpec("uint4", symmetric=False, granularity=Granularity.BLOCK, axis=0,
                                        block_size=32)])
def test_refit_scales_lowers_the_output_error_for_the_same_codes(spec):
    """With the codes and zero points fixed, the refit scales are the least-squares optimum of
    tr(E^T H E): below GPTQ's own scales on every output channel, with the signs kept."""
    rows = 256 + 16  # a partial last block
    h = _correlated_hessian(rows, 4)
    w = np.random.default_rng(5).standard_normal((rows, 48)).astype(np.float32) * 0.05
    q, scale, zero = gptq_quantize(w, h, spec, clip_ratios=CLIP_RATIOS)
    refit = refit_scales(w, h, q, scale, zero, spec)
    assert refit.shape == scale.shape and refit.dtype == np.float32
    assert np.all(np.sign(refit) == np.sign(scale))
    before = dequantize_kn(q, scale, zero, spec) - w
    after = dequantize_kn(q, refit, zero, spec) - w
    per_channel = [np.einsum("kn,kj,jn->n", e, h.astype(np.float64), e) for e in (before, after)]
    assert np.all(per_channel[1] <= per_channel[0] * (1 + 1e-6))
    assert per_channel[1].sum() < 0.999 * per_channel[0].sum()
    # the same through gptq_quantize, and its codes are unchanged
    q2, scale2, zero2 = gptq_quantize(w, h, spec, clip_ratios=CLIP_RATIOS, refit_rounds=1)
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(zero2, zero)
    np.testing.assert_allclose(scale2, refit, rtol=1e-6)
    # more rounds: GPTQ again on the refit scales; never worse than one round
    q3, scale3, zero3 = gptq_quantize(w, h, spec, clip_ratios=CLIP_RATIOS, refit_rounds=3)
    np.testing.assert_array_equal(zero3, zero)
    errors = output_errors(h, w, dequantize_kn(q2, scale2, zero2, spec), dequantize_kn(q3, scale3, zero3, spec))
    assert errors[1] <= errors[0] * (1 + 1e-6)


def test_refit_scales_leaves_constrained_scales_alone():
    """Power-of-two and fixed scales are a target's constraint, and a channel whose codes are all
    at the zero point has nothing to solve: those scales come back unchanged."""
    h = _correlated_hessian(64, 6)
    w = np.random.default_rng(7).standard_normal((64, 8)).astype(np.float32)
    pow2 = INT8_CHANNEL.replace(scale_pow2=True)
    q, scale, zero = gptq_quantize(w, h, pow2)
    np.testing.assert_array_equal(refit_scales(w, h, q, scale, zero, pow2), scale)
    w[:, 3] = 0.0
    q, scale, zero = gptq_quantize(w, h, INT4_G32)
    refit = refit_scales(w, h, q, scale, zero, INT4_G32)
    np.testing.assert_array_equal(refit[:, 3], scale[:, 3])
    assert not np.array_equal(refit[:, 2], scale[:, 2])


def test_refit_scales_stay_a_correction_when_calibration_spans_few_directions():
    """16 calibration tokens for K = 128 inputs: the refit moves no scale by more than
    REFIT_RANGE either way, and the error on other inputs does not grow."""
    rng = np.random.default_rng(8)
    rows = 128
    few = rng.standard_normal((16, rows)).astype(np.float32) * rng.uniform(0.05, 3, rows).astype(np.float32)
    h_few = 2 * few.T @ few / len(few)
    many = rng.standard_normal((4096, rows)).astype(np.float32)
    h_many = 2 * many.T @ many / len(many)
    w = rng.standard_normal((rows, 32)).astype(np.float32)
    q, scale, zero = gptq_quantize(w, h_few, INT4_G32)
    refit = refit_scales(w, h_few, q, scale, zero, INT4_G32)
    ratio = refit / scale
    assert np.all((ratio >= 1 / REFIT_RANGE) & (ratio <= REFIT_RANGE))
    assert not np.allclose(ratio, 1.0)
    held_out = output_errors(h_many, w, *(dequantize_kn(q, s, zero, INT4_G32) for s in (scale, refit)))
    assert held_out[1] <= 1.05 * held_out[0]
