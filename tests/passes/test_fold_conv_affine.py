"""fold-conv-affine: a per-channel (or scalar) Mul/Add of a constant after a Conv or ConvTranspose is
folded into its weights and bias; the graph computes the same; other shapes and shared outputs stay."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgeq.ir import load, to_model_proto
from edgeq.pipeline import PassContext
from edgeq.registry import get_pass, get_target

RNG = np.random.default_rng(0)


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def _model(tail: list[tuple[str, np.ndarray]], transpose: bool = False, extra_reader: bool = False):
    """x [1, 4, 6, 6] -> Conv (or ConvTranspose, 4 -> 6 channels) -> each (op, constant) of `tail`."""
    channels = 6
    weight = RNG.standard_normal((4, channels, 2, 2) if transpose else (channels, 4, 3, 3))
    inits = [_const("w", weight)]
    conv = (helper.make_node("ConvTranspose", ["x", "w"], ["t0"], strides=[2, 2]) if transpose
            else helper.make_node("Conv", ["x", "w"], ["t0"], pads=[1, 1, 1, 1]))
    nodes, last = [conv], "t0"
    for i, (op, constant) in enumerate(tail):
        inits.append(_const(f"c{i}", constant))
        nodes.append(helper.make_node(op, [last, f"c{i}"], [f"t{i + 1}"]))
        last = f"t{i + 1}"
    outputs = [helper.make_tensor_value_info(last, TensorProto.FLOAT, None)]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["t0"], ["side"]))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model)


def _fold(model: onnx.ModelProto):
    result = get_pass("fold-conv-affine")().run(load(model), PassContext())
    return to_model_proto(result.graph), result.stats


def _same(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    x = RNG.standard_normal((1, 4, 6, 6)).astype(np.float32)
    want = ort.InferenceSession(before.SerializeToString()).run(None, {"x": x})
    got = ort.InferenceSession(after.SerializeToString()).run(None, {"x": x})
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_a_mobileone_scale_and_shift_fold_into_the_conv():
    model = _model([("Mul", RNG.standard_normal((1, 6, 1, 1))), ("Add", RNG.standard_normal((6, 1, 1)))])
    folded, stats = _fold(model)
    assert stats == {"scales_folded": 1, "shifts_folded": 1}
    assert [n.op_type for n in folded.graph.node] == ["Conv"] and len(folded.graph.node[0].input) == 3
    assert folded.graph.output[0].name == "t2"  # the readers' name is kept
    onnx.checker.check_model(folded, full_check=True)
    _same(model, folded)


def test_a_scalar_scale_folds_and_a_conv_transpose_keeps_its_bias_add():
    model = _model([("Mul", np.array(0.5))])
    folded, stats = _fold(model)
    assert stats == {"scales_folded": 1, "shifts_folded": 0} and [n.op_type for n in folded.graph.node] == ["Conv"]
    _same(model, folded)
    transposed = _model([("Add", RNG.standard_normal((1, 6, 1, 1)))], transpose=True)
    kept, stats = _fold(transposed)  # the HTP computes a ConvTranspose with a bias wrongly
    assert stats == {"scales_folded": 0, "shifts_folded": 0}
    assert [n.op_type for n in kept.graph.node] == ["ConvTranspose", "Add"]


def test_constants_varying_off_the_channel_axis_and_shared_outputs_stay():
    for model in (_model([("Add", RNG.standard_normal((1, 6, 6, 6)))]),
                  _model([("Mul", RNG.standard_normal((1, 1, 1, 6)))]),
                  _model([("Add", RNG.standard_normal((1, 6, 1, 1)))], extra_reader=True)):
        folded, stats = _fold(model)
        assert stats == {"scales_folded": 0, "shifts_folded": 0}
        assert [n.op_type for n in folded.graph.node] == [n.op_type for n in model.graph.node]


def test_the_qnn_htp_pipeline_folds_after_batch_norms():
    pipeline = get_target("qnn-htp").default_pipeline
    assert pipeline.index("fold-batch-norm") < pipeline.index("fold-conv-affine") < pipeline.index("calibrate")
