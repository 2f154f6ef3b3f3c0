"""tile-norm-input-constants: a constant that broadcasts over the batch axis of an Add/Mul feeding a
norm is given at the full static shape (the HTP computes the fused broadcast wrongly at batch > 1),
per-channel constants and other consumers stay as they were, and the graph computes the same."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgeq.ir import load, to_model_proto
from edgeq.pipeline import PassContext
from edgeq.registry import get_pass, get_target


def _model(constant_shape: tuple[int, ...], consumer: str = "LayerNormalization", batch: int = 2,
           op: str = "Add") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    constant = numpy_helper.from_array(rng.standard_normal(constant_shape).astype(np.float32), "position")
    gamma = numpy_helper.from_array(np.full(8, 1.5, np.float32), "gamma")
    nodes = [helper.make_node(op, ["x", "position"], ["summed"])]
    if consumer == "LayerNormalization":
        nodes.append(helper.make_node("LayerNormalization", ["summed", "gamma"], ["y"], axis=-1))
    else:
        nodes.append(helper.make_node(consumer, ["summed"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, 8])],
                              [constant, gamma])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _run(model: onnx.ModelProto):
    graph = load(model)
    result = get_pass("tile-norm-input-constants")().run(graph, PassContext())
    return to_model_proto(result.graph), result


def _constant_shape(model: onnx.ModelProto) -> tuple[int, ...]:
    first = model.graph.node[0]
    inits = {i.name: i for i in model.graph.initializer}
    return tuple(inits[first.input[1]].dims)


def test_position_embeddings_broadcast_over_the_batch_are_tiled_and_the_graph_computes_the_same():
    for shape, op in (((1, 4, 8), "Add"), ((4, 8), "Add"), ((1, 4, 8), "Mul")):
        model = _model(shape, op=op)
        tiled, result = _run(model)
        assert result.modified and result.stats["constants_tiled"] == 1
        assert _constant_shape(tiled) == (2, 4, 8)
        onnx.checker.check_model(tiled, full_check=True)
        x = np.random.default_rng(1).standard_normal((2, 4, 8)).astype(np.float32)
        before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
        after = ort.InferenceSession(tiled.SerializeToString()).run(None, {"x": x})[0]
        np.testing.assert_allclose(before, after, rtol=1e-6, atol=1e-6)  # same values; kernels vectorize differently


def test_per_channel_constants_full_shapes_batch_one_and_other_consumers_are_left_alone():
    cases = [_model((1, 1, 8)), _model((8,)), _model((2, 4, 8)), _model((1, 4, 8), batch=1),
             _model((1, 4, 8), consumer="Sigmoid")]
    for model in cases:
        unchanged, result = _run(model)
        assert not result.modified and result.stats["constants_tiled"] == 0
        assert _constant_shape(unchanged) == _constant_shape(model)


def test_the_qnn_htp_pipeline_runs_it_after_the_norms_are_split():
    pipeline = get_target("qnn-htp").default_pipeline
    assert pipeline.index("split-norm-affine") < pipeline.index("tile-norm-input-constants") \
        < pipeline.index("calibrate")
