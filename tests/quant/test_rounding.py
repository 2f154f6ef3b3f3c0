"""The weight-rounding math on its own: GPTQ's column-by-column rounding against a Hessian
(static act-order groups, identity Hessian = round to nearest, dead channels) and the clip /
signed-scale search, on random matrices."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.quant.numerics import quantize_weight
from edgeq.quant.rounding import CLIP_RATIOS, dequantize_kn, gptq_quantize, output_errors, quantize_kn, search_params
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
    assert errors[1] <= errors[0]
