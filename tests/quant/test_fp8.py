"""FP8 E4M3FN weights and activations (--weights fp8 --activations fp8): float8
QuantizeLinear/DequantizeLinear (opset 19+). On the CPU an accuracy study: ONNX Runtime runs the
DQ'd tensors in fp32 (no float8 kernel)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edgeq.targets.base import QSpec, validate
from edgeq.targets.x86 import W_FP8_CHANNEL
from onnx import TensorProto, helper, numpy_helper

from edgeq.compiler import compile
from edgeq.errors import OptionError
from edgeq.options import CompileOptions
from edgeq.quant.numerics import dequantize, qparams, quantize, quantize_weight

E4M3 = ml_dtypes.float8_e4m3fn
# Every finite E4M3FN value (254 of the 256 codes; 0x7F and 0xFF are NaN).
ALL_E4M3 = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)
FINITE_E4M3 = np.unique(ALL_E4M3[np.isfinite(ALL_E4M3)])


def _representable(values: np.ndarray) -> bool:
    return bool(np.isin(np.asarray(values, np.float32), FINITE_E4M3).all())


def test_float8_spec_range_and_bits():
    spec = QSpec("float8e4m3fn")
    assert (spec.qmin, spec.qmax, spec.bits, spec.is_float, spec.symmetric_zero_point) == (-448, 448, 8, True, 0)
    assert spec.elem_type == TensorProto.FLOAT8E4M3FN
    scale, zero = qparams(-3.0, 8.96, spec)
    assert scale == np.float32(8.96 / 448) and zero.dtype == E4M3 and float(zero) == 0.0


def test_quantize_rounds_to_nearest_even_and_saturates():
    spec = QSpec("float8e4m3fn")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(5000) * 100, [1000.0, -1e6, 448.0, 464.0, 0.0]]).astype(np.float32)
    q = quantize(x, np.float32(1.0), np.zeros((), E4M3), spec)
    assert q.dtype == E4M3
    values = q.astype(np.float32)
    assert _representable(values) and np.all(np.abs(values) <= 448)
    assert values[-5] == 448 and values[-4] == -448   # saturated, not NaN
    # nearest representable value (ties to even): no finite E4M3 value lies closer
    finite = np.abs(x) <= 448
    nearest = FINITE_E4M3[np.abs(x[finite, None] - FINITE_E4M3[None, :]).argmin(axis=1)]
    assert np.all(np.abs(values[finite] - x[finite]) <= np.abs(nearest - x[finite]) + 1e-6)


def test_numpy_quantize_matches_onnxruntime_quantizelinear():
    """ORT's float8 QuantizeLinear (saturate=1) gives the same float8 bytes as edgeq's numpy."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 257)) * 3).astype(np.float32)
    scale = np.float32(0.0123)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "q8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [numpy_helper.from_array(np.array(scale), "s"),
         helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    spec = QSpec("float8e4m3fn")
    want = dequantize(quantize(x, scale, np.zeros((), E4M3), spec), scale, np.zeros((), E4M3))
    np.testing.assert_array_equal(got, want)


def test_weights_per_channel_are_e4m3_with_amax_on_448():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((64, 24)) * rng.uniform(0.01, 2, 24)).astype(np.float32)
    q, scale, zero = quantize_weight(w, W_FP8_CHANNEL, channel_axis=1)
    assert q.dtype == E4M3 and scale.shape == (24,) and np.all(zero.astype(np.float32) == 0)
    np.testing.assert_allclose(np.abs(q.astype(np.float32)).max(axis=0), 448)
    deq = q.astype(np.float32) * scale
    # E4M3's 3 mantissa bits: relative error of a normal value at most 2^-4
    big = np.abs(w) > scale * 2.0**-6 * 4
    assert np.all(np.abs(deq - w)[big] <= np.abs(w)[big] * 2.0**-4 + 1e-12)


def _mlp(k: int = 64, h: int = 96) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    w1 = (rng.standard_normal((k, h)) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((h, k)) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["o"], name="down"), helper.make_node("Relu", ["o"], ["y"])],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", k])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_compiled_fp8_qdq_is_e4m3fn_and_runs(tmp_path):
    rng = np.random.default_rng(4)
    samples = [{"x": rng.standard_normal((1, 8, 64)).astype(np.float32)} for _ in range(6)]
    compiled = compile(_mlp(), "x86-vnni", CompileOptions(weights="fp8", activations="fp8"),
                       calibration=samples, provider="cpu")
    assert compiled.report.scheme == "W8A8 FP8 E4M3FN"
    assert not validate(compiled.graph, compiled.target, raise_on_error=False)
    proto = onnx.load(compiled.save(tmp_path / "fp8.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    qdq = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    q_nodes = [n for n in qdq if n.op_type == "QuantizeLinear"]
    assert len(q_nodes) == 2   # the two linears' inputs
    weight_dqs = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_dqs) == 2
    for node in q_nodes:  # activations: no zero point (0), float8 by output_dtype
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert len(node.input) == 2 and attrs["output_dtype"] == TensorProto.FLOAT8E4M3FN
    for node in weight_dqs:
        zero = inits[node.input[2]]
        assert zero.data_type == TensorProto.FLOAT8E4M3FN and numpy_helper.to_array(zero).astype(np.float32).max() == 0
    for node in weight_dqs:
        stored = numpy_helper.to_array(inits[node.input[0]])
        assert inits[node.input[0]].data_type == TensorProto.FLOAT8E4M3FN
        assert _representable(stored.astype(np.float32))
        assert np.abs(stored.astype(np.float32)).max() == 448
    # the activations ORT quantizes are E4M3FN values too: expose the Q outputs
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    for node in q_nodes:
        probe.graph.output.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT8E4M3FN, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, 5, 64)).astype(np.float32)
    outs = session.run(None, {"x": x})
    codes = [q.view(E4M3) if q.dtype == np.uint8 else q for q in outs[1:]]  # ORT hands float8 back as bytes
    for q in codes:
        assert q.dtype == E4M3 and _representable(q.astype(np.float32)) and np.abs(q.astype(np.float32)).max() > 0
    # the graph input's quantizer: exactly edgeq's numpy float8 quantization
    # (SmoothQuant may scale x first: its search simulates the float8 grid too)
    first = next(i for i, node in enumerate(q_nodes) if node.input[0].startswith("x"))
    scale = numpy_helper.to_array(inits[q_nodes[first].input[1]])
    smooth = [n for n in proto.graph.node if n.op_type == "Mul" and n.output[0] == q_nodes[first].input[0]]
    x_in = x * numpy_helper.to_array(inits[smooth[0].input[1]]) if smooth else x
    want = quantize(x_in, scale, np.zeros((), E4M3), QSpec("float8e4m3fn"))
    assert np.array_equal(codes[first].view(np.uint8), want.view(np.uint8))
    report = compiled.report.verification
    # E4M3 keeps 3 mantissa bits: measured rel L2 0.067, cosine min 0.991 (two layers, Relu outputs)
    assert report is not None and report.outputs[0].relative_l2 < 0.1 and report.outputs[0].cosine_min > 0.98


def test_fp8_options_errors():
    with pytest.raises(OptionError, match="--weights fp8"):
        CompileOptions(activations="fp8")
    samples = [{"x": np.ones((1, 2, 64), np.float32)}]
    with pytest.raises(OptionError, match="rounded to nearest"):
        compile(_mlp(), "x86-vnni", CompileOptions(weights="fp8", activations="fp8", weight_rounding="gptq"),
                calibration=samples, provider="cpu")
