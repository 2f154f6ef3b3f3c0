"""constant-first-after-conv-transpose: `Add(ConvTranspose(x), c)` becomes `Add(c, ConvTranspose(x))`
(the HTP's fused ConvTranspose bias is wrong; apart, both ops are exact); other Adds keep their order."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgeq.ir import load, to_model_proto
from edgeq.pipeline import PassContext
from edgeq.registry import get_pass, get_target


def _model(producer: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    shape = (4, 4, 2, 2) if producer == "ConvTranspose" else (4, 4, 3, 3)
    attrs = {"strides": [2, 2]} if producer == "ConvTranspose" else {"pads": [1, 1, 1, 1]}
    nodes = [helper.make_node(producer, ["x", "w"], ["t"], **attrs), helper.make_node("Add", ["t", "b"], ["y"])]
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((1, 4, 1, 1)).astype(np.float32), "b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _run(model: onnx.ModelProto):
    result = get_pass("constant-first-after-conv-transpose")().run(load(model), PassContext())
    return to_model_proto(result.graph), result.stats


def test_the_bias_of_a_conv_transpose_comes_first_and_the_sum_is_the_same():
    model = _model("ConvTranspose")
    reordered, stats = _run(model)
    assert stats == {"adds_reordered": 1}
    assert list(reordered.graph.node[1].input) == ["b", "t"]
    x = np.random.default_rng(1).standard_normal((1, 4, 5, 5)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(reordered.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)


def test_other_adds_keep_their_order_and_the_qnn_htp_pipeline_runs_it():
    reordered, stats = _run(_model("Conv"))
    assert stats == {"adds_reordered": 0} and list(reordered.graph.node[1].input) == ["t", "b"]
    pipeline = get_target("qnn-htp").default_pipeline
    assert pipeline.index("constant-first-after-conv-transpose") < pipeline.index("insert-qdq")
