"""Shape inference with onnx's own inference, written back onto the IR's values."""

from __future__ import annotations

import onnx

from edgeq.ir import Graph
from edgeq.ir.to_proto import graph_to_proto, model_header
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.registry import register_pass

# Initializers up to this size carry their data into inference (shape tensors, axes); larger
# ones (weights) only their dims, so inference never copies the model's weights.
_DATA_LIMIT_BYTES = 1 << 16


def model_for_analysis(graph: Graph) -> onnx.ModelProto:
    """The model with small constants' data and only the dims of large weights."""
    model = model_header(graph)
    model.graph.CopyFrom(graph_to_proto(graph, with_data=False))
    for proto, value in zip(model.graph.initializer, graph.initializers):
        if value.const.nbytes <= _DATA_LIMIT_BYTES and not value.const.has_typed_storage():
            proto.CopyFrom(value.const.to_proto(value.name))
    return model


@register_pass
class ShapeInference(Pass):
    """Infer dtypes and shapes of intermediate values (onnx.shape_inference, data propagation on)."""

    name = "shape-inference"
    description = "infer dtypes and shapes of every value with onnx's shape inference"

    def __init__(self, overwrite: bool = False):
        self.overwrite = overwrite

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        inferred = onnx.shape_inference.infer_shapes(model_for_analysis(graph), data_prop=True)
        updated = 0
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            if not graph.has_value(vi.name):
                continue
            value = graph.value(vi.name)
            if value.const is not None or (value.type is not None and not self.overwrite
                                           and _is_complete(value.type)):
                continue
            if vi.type.HasField("tensor_type") and vi.type != value.type:
                value.type = onnx.TypeProto()
                value.type.CopyFrom(vi.type)
                updated += 1
        return PassResult(graph, updated > 0, {"values_typed": updated})


def _is_complete(type_proto: onnx.TypeProto) -> bool:
    tensor = type_proto.tensor_type
    return bool(tensor.elem_type) and tensor.HasField("shape")
