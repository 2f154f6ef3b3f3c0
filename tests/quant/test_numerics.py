"""Quantization arithmetic: qparams per spec, weight quantization error bounds per granularity,
and `quantize` bit-exact with ONNX Runtime's QuantizeLinear."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.quant.numerics import dequantize, np_storage_dtype, qparams, quantize, quantize_weight, sqnr_db
from edgeq.targets.base import Granularity, QSpec
from tests.passes.helpers import run

S8 = QSpec("int8", symmetric=True)
U8 = QSpec("uint8", symmetric=False)
S8_NARROW = QSpec("int8", symmetric=True, qrange=(-127, 127))
S7 = QSpec("int8", symmetric=True, qrange=(-64, 63))


# ---- qparams -------------------------------------------------------------------------------


def test_symmetric_int8_scale_covers_the_larger_magnitude_with_zero_point_0():
    scale, zero = qparams(-1.0, 2.0, S8)
    assert scale.dtype == np.float32 and zero.dtype == np.int8
    assert scale == np.float32(2.0 / 127) and zero == 0


def test_asymmetric_uint8_maps_range_ends_onto_qmin_qmax():
    scale, zero = qparams(-1.0, 3.0, U8)
    assert zero.dtype == np.uint8
    assert scale == np.float32(4.0 / 255)
    assert zero == 64  # round(0 - (-1) / (4/255)) = round(63.75)
    q = quantize(np.array([-1.0, 0.0, 3.0], np.float32), scale, zero, U8)
    assert q.tolist() == [0, 64, 255]
    assert dequantize(q, scale, zero)[1] == 0.0  # zero is exactly representable


def test_range_always_contains_zero():
    scale, zero = qparams(1.0, 3.0, U8)  # all-positive data: lo is pulled down to 0
    assert zero == 0 and scale == np.float32(3.0 / 255)
    scale, zero = qparams(-3.0, -1.0, U8)
    assert zero == 255 and scale == np.float32(3.0 / 255)


@pytest.mark.parametrize("spec,amax,expected_q", [(S8_NARROW, 2.0, 127), (S7, 2.0, 63)])
def test_narrow_ranges_symmetric(spec, amax, expected_q):
    scale, zero = qparams(-amax, amax, spec)
    assert zero == 0 and scale == np.float32(amax / expected_q)
    q = quantize(np.array([-amax, amax, -10 * amax], np.float32), scale, zero, spec)
    assert q.tolist() == [-expected_q, expected_q, spec.qmin]  # saturates at the narrow qmin


def test_unsigned_symmetric_centres_the_zero_point():
    scale, zero = qparams(-1.0, 0.5, QSpec("uint8", symmetric=True))
    assert zero == 128 and scale == np.float32(1.0 / 127.5)


@pytest.mark.parametrize("spec", [S8, U8, S7])
@pytest.mark.parametrize("amax", [1.0, 0.3, 5e-3, 123.0])
def test_pow2_scales_are_powers_of_two_that_still_cover_the_range(spec, amax):
    pow2 = spec.replace(scale_pow2=True)
    scale, zero = qparams(-amax, amax, pow2)
    exact, _ = qparams(-amax, amax, spec)
    assert np.log2(scale) == np.round(np.log2(scale))
    assert exact <= scale < 2 * exact
    q = quantize(np.array([-amax, amax], np.float32), scale, zero, pow2)
    assert spec.qmin <= q.min() and q.max() <= spec.qmax
    assert np.abs(dequantize(q, scale, zero) - [-amax, amax]).max() <= scale / 2 + 1e-7


def test_all_zero_range_gives_a_finite_scale_and_exact_zero():
    scale, zero = qparams(0.0, 0.0, U8)
    assert np.isfinite(scale) and scale > 0 and zero == 0
    assert dequantize(quantize(np.zeros(3, np.float32), scale, zero, U8), scale, zero).tolist() == [0, 0, 0]


def test_fixed_spec_imposes_scale_and_zero_point():
    scale, zero = qparams(-5.0, 7.0, QSpec("uint8", symmetric=False, fixed=(1 / 256, 0)))
    assert scale == np.float32(1 / 256) and zero == 0 and zero.dtype == np.uint8


def test_elementwise_qparams_per_channel():
    scale, zero = qparams(np.array([-1.0, -4.0]), np.array([2.0, 1.0]), S8)
    assert scale.tolist() == [np.float32(2 / 127), np.float32(4 / 127)]
    assert zero.tolist() == [0, 0]


# ---- weights -------------------------------------------------------------------------------


def _weight(shape=(96, 40), seed=0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.02
    w[3, 7] = 2.0  # one outlier, in column 7 and row 3
    return w


def _dequantized(q, scale, zero, spec: QSpec, shape, channel_axis: int) -> np.ndarray:
    if spec.granularity == Granularity.TENSOR:
        return dequantize(q, scale, zero)
    if spec.granularity == Granularity.CHANNEL:
        bshape = [1] * len(shape)
        bshape[channel_axis] = -1
        return dequantize(q, scale.reshape(bshape), zero.reshape(bshape))
    axis, block = spec.axis, spec.block_size
    full = lambda p: np.repeat(p, block, axis=axis).take(range(shape[axis]), axis=axis)  # noqa: E731
    return dequantize(q, full(scale), full(zero))


@pytest.mark.parametrize("spec,channel_axis,scale_shape", [
    (S8, 1, ()),
    (S8.replace(granularity=Granularity.CHANNEL), 1, (40,)),
    (S8.replace(granularity=Granularity.CHANNEL), 0, (96,)),
    (S7.replace(granularity=Granularity.CHANNEL), 1, (40,)),
    (QSpec("int4", granularity=Granularity.BLOCK, axis=0, block_size=32), 1, (3, 40)),
    (QSpec("int4", granularity=Granularity.BLOCK, axis=0, block_size=64), 1, (2, 40)),  # partial last block
    (QSpec("uint4", symmetric=False, granularity=Granularity.BLOCK, axis=0, block_size=16), 1, (6, 40)),
])
def test_quantize_weight_round_trip_error_is_at_most_half_a_step(spec, channel_axis, scale_shape):
    w = _weight()
    q, scale, zero = quantize_weight(w, spec, channel_axis)
    assert q.shape == w.shape and q.dtype == np_storage_dtype(spec)
    assert scale.shape == scale_shape and zero.shape == scale_shape and scale.dtype == np.float32
    ints = q.astype(np.int32)
    assert spec.qmin <= ints.min() and ints.max() <= spec.qmax
    back = _dequantized(q, scale, zero, spec, w.shape, channel_axis)
    step = _dequantized(np.ones_like(q), scale, np.zeros_like(zero), spec, w.shape, channel_axis)
    assert np.all(np.abs(back - w) <= step / 2 * (1 + 1e-5) + 1e-9)
    if spec.symmetric and spec.signed:
        assert not np.any(zero.astype(np.int32))


def test_finer_granularity_confines_the_outlier_damage():
    """The outlier at [3, 7] coarsens every step of a per-tensor scale, only column 7 per channel,
    and only its 32-row block of column 7 per block."""
    w = _weight()
    errors = {}
    for label, spec in [("tensor", S8), ("channel", S8.replace(granularity=Granularity.CHANNEL)),
                        ("block", QSpec("int8", granularity=Granularity.BLOCK, axis=0, block_size=32))]:
        q, s, z = quantize_weight(w, spec, channel_axis=1)
        errors[label] = np.abs(_dequantized(q, s, z, spec, w.shape, 1) - w)
    others = np.ones(w.shape, bool)
    others[:, 7] = False
    assert errors["channel"][others].max() < errors["tensor"][others].max() / 20
    assert errors["block"][32:, 7].max() < errors["channel"][32:, 7].max() / 20
    assert sqnr_db(w, w) == float("inf")


def test_clip_ratio_shrinks_the_scale():
    w = _weight()
    _, full, _ = quantize_weight(w, S8, 1)
    _, clipped, _ = quantize_weight(w, S8, 1, clip_ratio=0.5)
    assert clipped == pytest.approx(full / 2, rel=1e-6)


# ---- bit-exactness with ONNX Runtime ---------------------------------------------------------


def _ort_quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int | None, opset: int) -> np.ndarray:
    zp = numpy_helper.from_array(zero, "z") if zero.dtype not in (ml_dtypes.int4, ml_dtypes.uint4) else \
        helper.make_tensor("z", TensorProto.INT4 if zero.dtype == ml_dtypes.int4 else TensorProto.UINT4,
                           zero.shape, zero.astype(np.int8).flatten().tolist())
    attrs = {"axis": axis} if axis is not None else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs)]
    elem = zp.data_type
    if elem in (TensorProto.INT4, TensorProto.UINT4):  # ORT's Python API returns no 4-bit arrays
        elem = TensorProto.INT8 if elem == TensorProto.INT4 else TensorProto.UINT8
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q4"], **attrs),
                 helper.make_node("Cast", ["q4"], ["q"], to=elem)]
    graph = helper.make_graph(
        nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("q", elem, list(x.shape))],
        [numpy_helper.from_array(scale, "s"), zp])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10 if opset >= 21 else 8)
    return run(m, {"x": x})[0]


def _probe(scale: np.ndarray, zero: np.ndarray, spec: QSpec, shape, seed: int) -> np.ndarray:
    """Random values over the range plus exact .5 ties and far out-of-range values."""
    rng = np.random.default_rng(seed)
    s = np.broadcast_to(scale, shape).astype(np.float32)
    z = np.broadcast_to(zero.astype(np.float32), shape)
    span = (spec.qmax - spec.qmin) * s
    x = (rng.uniform(-0.6, 0.6, shape) * span * 1.2).astype(np.float32)
    ties = ((rng.integers(spec.qmin, spec.qmax, shape) - z + 0.5) * s).astype(np.float32)
    mask = rng.random(shape) < 0.3
    x = np.where(mask, ties, x)
    x.flat[0], x.flat[1] = 1e6, -1e6
    return x


@pytest.mark.parametrize("spec,opset", [(U8, 17), (S8, 17), (S7, 17), (QSpec("int16"), 21),
                                        (QSpec("uint16", symmetric=False), 21), (QSpec("int4"), 21),
                                        (QSpec("uint4", symmetric=False), 21)])
def test_quantize_matches_ort_quantize_linear_bit_for_bit_per_tensor(spec, opset):
    scale, zero = qparams(-0.75, 1.25, spec)
    scale = np.float32(2.0**-7) if spec.symmetric else scale  # power of two: ties are exact
    x = _probe(scale, zero, spec, (16, 64), seed=spec.bits)
    ours = quantize(x, scale, zero, spec)
    theirs = _ort_quantize(x, np.asarray(scale, np.float32), np.asarray(zero), None, opset)
    if spec.qrange:  # ORT saturates to the dtype; edgeq to the narrower range: compare inside it
        theirs = np.clip(theirs, spec.qmin, spec.qmax)
    assert ours.dtype == np_storage_dtype(spec)
    assert np.array_equal(ours.astype(np.int32), theirs.astype(np.int32))


def test_quantize_matches_ort_per_channel():
    spec = U8
    rng = np.random.default_rng(3)
    lo, hi = -rng.uniform(0.1, 2, 32), rng.uniform(0.1, 2, 32)
    scale, zero = qparams(lo, hi, spec)
    x = _probe(scale, zero, spec, (8, 32), seed=4)
    ours = quantize(x, scale.reshape(1, -1), zero.reshape(1, -1), spec)
    theirs = _ort_quantize(x, scale, zero, 1, 17)
    assert np.array_equal(ours, theirs)


def test_subnormal_weights_get_a_scale_whose_bias_scale_stays_normal():
    """float32 weights below 1.2e-38 (PP-OCR's Conv weights have them) once gave a subnormal channel
    scale, and the int32 bias scale s_x * s_w underflowed to 0, which validate rejects."""
    spec = QSpec("int8", symmetric=True, granularity=Granularity.CHANNEL)
    scale, zero = qparams(np.float32(-3e-39), np.float32(2e-39), spec)
    smallest_activation_scale = np.float32(2.0**-24)
    assert np.isfinite(scale) and float(scale) >= np.finfo(np.float32).tiny
    assert float(np.float32(scale * smallest_activation_scale)) > 0.0
    assert int(quantize(np.float32(2e-39), scale, zero, spec)) == 0     # as small as it was: still 0
    normal_scale, _ = qparams(-1.0, 1.0, spec)
    assert float(normal_scale) == np.float32(1 / 127)                   # ordinary ranges are untouched


def test_channel_scales_have_a_floor_relative_to_the_largest_when_the_spec_sets_one():
    w = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    w[1] *= 1e-30   # a dead output channel (PP-OCRv4 det's SE convs hold such)
    w[2] *= 1e-3    # small but above the floor: untouched
    plain = QSpec("int8", symmetric=True, granularity=Granularity.CHANNEL)
    floored = QSpec("int8", symmetric=True, granularity=Granularity.CHANNEL, channel_scale_floor=2.0**-12)
    q0, s0, _ = quantize_weight(w, plain, channel_axis=0)
    q1, s1, z1 = quantize_weight(w, floored, channel_axis=0)
    assert s0[1] < s0.max() * 1e-20 and s1[1] == np.float32(s0.max() * 2.0**-12)
    assert not q1[1].any()  # below the floor everything rounds to 0
    np.testing.assert_array_equal(np.delete(s1, 1), np.delete(s0, 1))
    np.testing.assert_array_equal(np.delete(q1, 1, axis=0), np.delete(q0, 1, axis=0))
    assert not z1.any()
