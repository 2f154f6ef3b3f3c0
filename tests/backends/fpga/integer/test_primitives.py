"""The shared primitives (shifts, rounding, dyadic multiply, saturation) and the builder."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest

from edgeq.errors import EdgeqError, OptionError
from edgeq.backends.fpga.integer import (IntGraphBuilder, QTensor, Rounding, dyadic_affine, emit_gelu, emit_layernorm,
                           emit_requantize, emit_rmsnorm, emit_sigmoid, emit_silu, emit_softmax, kernel_model, ops)
from edgeq.backends.fpga.integer.builder import OPSET, onnx_type
from edgeq.backends.fpga.integer.fixedpoint import (np_bit_length, np_dyadic, np_saturate, np_shift, np_shift_by,
                                      np_shift_right_rounding, pow2_exponent)

I64_EDGES = np.array([0, 1, -1, 2, -2, 3, -3, 5, -5, 2**61, -(2**61), 2**62 - 1, -(2**62), 12345678901, -98765432109],
                     np.int64)


def _single_op_model(emit: Callable[[IntGraphBuilder, str], str], x: np.ndarray) -> onnx.ModelProto:
    """A model of primitives applied to one input of any integer dtype (int64/uint64 included)."""
    builder = IntGraphBuilder()
    out = emit(builder, builder.declare_value("x", x.dtype))
    if out == "x":  # the primitive was a no-op (shift by 0)
        out = builder.op("Identity", [out])
    graph = onnx.helper.make_graph(builder.nodes, "prim",
                                   [onnx.helper.make_tensor_value_info("x", onnx_type(x.dtype), list(x.shape))],
                                   [onnx.helper.make_tensor_value_info(out, onnx_type(builder.dtype(out)), None)],
                                   builder.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("rounding", list(Rounding))
@pytest.mark.parametrize("shift", [1, 2, 7, 31, 40, 62])
def test_signed_rounding_shift_matches_numpy(run_model, rng, rounding: Rounding, shift: int) -> None:
    x = np.concatenate([I64_EDGES, rng.integers(-(2**61), 2**61, 2000), rng.integers(-8, 8, 200) << max(shift - 3, 0)])
    model = _single_op_model(lambda b, n: ops.shift_right_rounding(b, n, shift, rounding), x)
    assert np.array_equal(run_model(model, {"x": x}), np_shift_right_rounding(x, shift, rounding))


def test_half_even_ties_and_half_up_ties() -> None:
    x = np.array([-5, -3, -1, 1, 3, 5], np.int64)  # all exact ties when divided by 2
    assert np_shift_right_rounding(x, 1, Rounding.HALF_UP).tolist() == [-2, -1, 0, 1, 2, 3]
    assert np_shift_right_rounding(x, 1, Rounding.HALF_EVEN).tolist() == [-2, -2, 0, 0, 2, 2]
    assert np.array_equal(np_shift_right_rounding(x, 1, Rounding.HALF_EVEN), np.round(x / 2).astype(np.int64))


def test_per_channel_shift_and_unsigned_path(run_model, rng) -> None:
    shifts = np.array([1, 5, 17, 33], np.int64)
    x = rng.integers(-(2**60), 2**60, (64, 4))
    model = _single_op_model(lambda b, n: ops.shift_right_rounding(b, n, shifts), x)
    assert np.array_equal(run_model(model, {"x": x}), np_shift_right_rounding(x, shifts, Rounding.HALF_UP))
    unsigned = rng.integers(0, 2**62, 500).astype(np.uint64)
    model = _single_op_model(lambda b, n: ops.shift_right_rounding(b, n, 9), unsigned)
    assert np.array_equal(run_model(model, {"x": unsigned}), np_shift_right_rounding(unsigned.astype(np.int64), 9,
                                                                                       Rounding.HALF_UP))


@pytest.mark.parametrize("amount", [-13, -1, 0, 1, 20])
def test_shift_left_or_right(run_model, amount: int) -> None:
    x = np.array([-(2**31), -7, -1, 0, 1, 7, 2**31 - 1], np.int64)
    model = _single_op_model(lambda b, n: ops.shift(b, n, amount), x)
    assert np.array_equal(run_model(model, {"x": x}), np_shift(x, amount))


def test_dynamic_shift_by_signed_exponents(run_model, rng) -> None:
    x = rng.integers(-(2**40), 2**40, (200, 3))
    x[:4] = [[0, 1, -1], [2**40 - 1, -(2**40), 3], [5, -5, 7], [-7, 2, -2]]
    exponent = rng.integers(-40, 21, (200, 1))  # one exponent per row, as the norms use it
    exponent[:4, 0] = [0, -40, -1, 20]
    builder = IntGraphBuilder()
    out = ops.shift_by(builder, builder.declare_value("x", np.int64), builder.declare_value("k", np.int64))
    graph = onnx.helper.make_graph(builder.nodes, "shift_by", [
        onnx.helper.make_tensor_value_info("x", onnx.TensorProto.INT64, [200, 3]),
        onnx.helper.make_tensor_value_info("k", onnx.TensorProto.INT64, [200, 1])],
        [onnx.helper.make_tensor_value_info(out, onnx.TensorProto.INT64, [200, 3])], builder.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    got = run_model(model, {"x": x, "k": exponent})
    assert np.array_equal(got, np_shift_by(x, exponent))
    assert np.array_equal(got[exponent[:, 0] >= 0], (x << np.maximum(exponent, 0))[exponent[:, 0] >= 0])
    assert np.array_equal(got, np.floor(x * 2.0**exponent + 0.5).astype(np.int64))


@pytest.mark.parametrize("dtype, value_bits", [(np.uint32, 31), (np.uint64, 62)])
def test_bit_length_priority_encoder(run_model, rng, dtype, value_bits: int) -> None:
    x = np.concatenate([[0, 1, 2, 3, 4, 2**value_bits - 1], 2 ** np.arange(value_bits, dtype=np.uint64),
                        rng.integers(0, 2**value_bits, 1000, dtype=np.uint64)]).astype(dtype)
    model = _single_op_model(lambda b, n: ops.bit_length(b, n, value_bits), x)
    expected = np.array([int(v).bit_length() for v in x])
    assert np.array_equal(run_model(model, {"x": x}), expected)
    assert np.array_equal(np_bit_length(x.astype(np.int64), value_bits), expected)


def test_saturate_clips_before_narrowing(run_model) -> None:
    x = np.array([-(2**40), -129, -128, 0, 127, 128, 300, 2**40], np.int64)
    model = _single_op_model(lambda b, n: ops.saturate(b, n, np.int8), x)
    assert run_model(model, {"x": x}).tolist() == [-128, -128, -128, 0, 127, 127, 127, 127]
    assert np.array_equal(np_saturate(x, np.int8), run_model(model, {"x": x}))


def test_dyadic_affine_prefers_pure_shifts_and_stays_in_budget(run_model, rng) -> None:
    assert dyadic_affine(2.0**-7, input_bound=2**31).is_pure_shift
    scales, biases = np.array([0.3, 1e-4, 0.0, -2.5]), np.array([1.0, -3.0, 0.5, 0.0])
    approx = dyadic_affine(scales, input_bound=2**31, real_bias=biases)
    assert not approx.is_pure_shift and np.all(approx.shift >= 1)
    assert np.all(np.abs(approx.multiplier) < 2**31)
    assert np.all(2**31 * np.abs(approx.multiplier) + np.abs(approx.bias) + (1 << (approx.shift - 1)) <= 2**62)
    x = np.concatenate([rng.integers(-(2**31), 2**31, (256, 4)), np.full((1, 4), -(2**31)), np.full((1, 4), 2**31 - 1)])
    model = _single_op_model(lambda b, n: ops.dyadic(b, n, approx), x)
    got = run_model(model, {"x": x})
    assert np.array_equal(got, np_dyadic(x, approx))
    real = x * scales + biases
    assert np.abs(got - real).max() <= 0.5 + 2**31 * 2.0**-30  # rounding + multiplier precision


def test_pow2_exponent() -> None:
    assert pow2_exponent(2.0**-7) == 7 and pow2_exponent(4.0) == -2 and pow2_exponent(0.3) is None
    assert pow2_exponent(0.0) is None and pow2_exponent(float("inf")) is None


def test_builder_names_are_unique_across_kernels(run_model, rng) -> None:
    builder = IntGraphBuilder(prefix="block", reserved=["block/softmax/cast"])
    x = QTensor("scores", np.int32, 1e-3)
    first, second = emit_softmax(builder, x), emit_softmax(builder, x, out_dtype=np.int8)
    names = [o for n in builder.nodes for o in n.output] + [n.name for n in builder.nodes] + \
            [i.name for i in builder.initializers]
    assert len(names) == len(set(names)) and "block/softmax/cast" not in names
    model = builder.to_model([(x, [2, 16])], [first, second])
    assert len(model.graph.output) == 2
    scores = rng.integers(-5000, 5000, (2, 16)).astype(np.int32)
    assert run_model(model, {"scores": scores}).dtype == np.uint8


def test_user_errors_are_edgeq_errors() -> None:
    builder = IntGraphBuilder()
    with pytest.raises(OptionError):
        QTensor("x", np.float32, 1.0)
    with pytest.raises(OptionError):
        QTensor("x", np.int8, 0.0)
    with pytest.raises(OptionError, match="power of two"):
        emit_gelu(builder, QTensor("x", np.int32, 2**-10), out_scale=0.1)
    with pytest.raises(OptionError, match="mask scale"):
        emit_softmax(builder, QTensor("s", np.int32, 1e-3), mask=QTensor("m", np.int32, 2e-3))
    with pytest.raises(OptionError):
        emit_softmax(builder, QTensor("s", np.int32, 1e-3), out_dtype=np.int16)
    with pytest.raises(OptionError, match="too coarse"):
        emit_softmax(builder, QTensor("s", np.int32, 1e9))
    with pytest.raises(EdgeqError):
        emit_layernorm(builder, QTensor("x", np.uint8, 1.0), np.ones(4), None, out_scale=2**-4)
    with pytest.raises(EdgeqError, match="epsilon"):
        emit_rmsnorm(builder, QTensor("x", np.int8, 2.0**-30), np.ones(8), out_scale=2**-4, eps=1e30)
    with pytest.raises(OptionError, match="power-of-two"):
        emit_requantize(builder, QTensor("acc", np.int32, 0.3), 2**-4, shift_only=True)


INTEGER_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
                 onnx.TensorProto.INT32, onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
                 onnx.TensorProto.BOOL}

KERNELS = {
    "softmax": (lambda b, x: emit_softmax(b, x), np.int16, 2**-8),
    "gelu": (lambda b, x: emit_gelu(b, x, out_scale=2**-4), np.int8, 2**-4),
    "sigmoid": (lambda b, x: emit_sigmoid(b, x), np.int8, 2**-4),
    "silu": (lambda b, x: emit_silu(b, x, out_scale=2**-4), np.int8, 2**-4),
    "layernorm": (lambda b, x: emit_layernorm(b, x, np.ones(16), np.zeros(16), out_scale=2**-4), np.int8, 2**-4),
    "rmsnorm": (lambda b, x: emit_rmsnorm(b, x, np.ones(16), out_scale=2**-4), np.int8, 2**-4),
    "requant_dyadic": (lambda b, x: emit_requantize(b, x, 2**-9), np.int16, 0.001),
    "requant_shift": (lambda b, x: emit_requantize(b, x, 2**-2, shift_only=True), np.int16, 2**-8),
}


@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_graph_is_integer_from_quantize_to_dequantize(run_model, kind: str) -> None:
    emit, dtype, scale = KERNELS[kind]
    model = kernel_model(emit, QTensor("x", dtype, scale), [3, 16], float_io=True)  # checked with full_check
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input,
                                                              *model.graph.output]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for name in [*node.input, *node.output]:
            assert types[name] in INTEGER_TYPES, f"{kind}: {node.op_type} touches non-integer '{name}'"
    assert [n.op_type for n in model.graph.node].count("QuantizeLinear") == 1
    assert model.graph.node[-1].op_type == "DequantizeLinear"
    x = np.linspace(-3, 3, 48, dtype=np.float32).reshape(3, 16)
    assert np.all(np.isfinite(run_model(model, {"x_float": x})))


def test_package_docstring_example(run_model, rng) -> None:
    """The usage example of edgeq.backends.fpga.integer's docstring, run."""
    import math

    from edgeq.backends.fpga.integer import softmax_reference
    s_q, s_k = 0.05, 0.04
    b = IntGraphBuilder(prefix="layer0")
    scores = QTensor("scores", np.int32, scale=s_q * s_k / math.sqrt(64))
    probs = emit_softmax(b, scores, out_dtype=np.uint8)
    model = b.to_model([(scores, ["batch", 12, "seq", "seq"])], [probs])
    scores_int32 = rng.integers(-30000, 30000, (1, 12, 9, 9)).astype(np.int32)
    expected = softmax_reference(scores_int32, scores.scale)
    assert probs.scale == 2**-8 and np.array_equal(run_model(model, {"scores": scores_int32}), expected)
