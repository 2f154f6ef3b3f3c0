"""Turn MatMul(x, W) + bias into Reshape -> Gemm(x2d, W, bias) -> Reshape.

Exporters write linear layers of 3-D activations as MatMul + Add. ONNX Runtime fuses a QDQ
Gemm (bias included, and the output quantizer when there is one) into one QGemm kernel,
while a QDQ MatMul leaves the bias Add (and any output QuantizeLinear) as separate passes
over the activation. The reshapes are metadata-only in ORT; the output shape is rebuilt from
the input's own shape, so dynamic batch and sequence dims stay dynamic.
"""

from __future__ import annotations

import numpy as np
import onnx

from edgeq.ir import Graph, Op, Value
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.registry import register_pass


@register_pass
class LinearToGemm(Pass):
    name = "linear-to-gemm"
    description = "rewrite MatMul + bias Add of N-D activations as Reshape -> Gemm -> Reshape"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        shapes: dict[str, Value] = {}
        rewritten = 0
        for op in graph.topo_order():
            match = _match(graph, op)
            if match is not None:
                _rewrite(graph, op, *match, shapes)
                rewritten += 1
        return PassResult(graph, rewritten > 0, {"linears": rewritten})


def _match(graph: Graph, matmul: Op) -> tuple[Op, Value] | None:
    """(bias Add, bias value) when `matmul` is a linear layer with a bias of its own."""
    if matmul.op_type != "MatMul" or matmul.domain:
        return None
    x, w = graph.inputs_of(matmul)
    weight = w.const if w is not None else None
    if weight is None or len(weight.dims) != 2 or x is None or x.shape is None or len(x.shape) < 2:
        return None
    if x.elem_type != onnx.TensorProto.FLOAT or weight.elem_type != onnx.TensorProto.FLOAT:
        return None
    out = graph.outputs_of(matmul)[0]
    readers = graph.consumers(out)
    if len(readers) != 1 or graph.is_graph_output(out) or readers[0].op_type != "Add":
        return None
    add = readers[0]
    ins = graph.inputs_of(add)
    bias = ins[0] if ins[1] is out else ins[1]
    tensor = bias.const if bias is not None else None
    if tensor is None or tensor.dims != (weight.dims[1],) or tensor.elem_type != onnx.TensorProto.FLOAT:
        return None
    return add, bias


def _rewrite(graph: Graph, matmul: Op, add: Op, bias: Value, shapes: dict[str, Value]) -> None:
    x, w = graph.inputs_of(matmul)
    k, n = w.const.dims
    result = graph.outputs_of(add)[0]
    flat_shape = graph.add_constant(f"{matmul.name}_flat_shape", np.array([-1, k], np.int64))
    flatten = graph.add_op("Reshape", [x, flat_shape], [f"{x.name}_2d"], before=matmul)
    x2 = graph.outputs_of(flatten)[0]
    x2.set_type(onnx.TensorProto.FLOAT, [None, k])
    gemm = graph.add_op("Gemm", [x2, w, bias], [f"{result.name}_2d"], name=f"{matmul.name}_gemm", after=matmul)
    y2 = graph.outputs_of(gemm)[0]
    y2.set_type(onnx.TensorProto.FLOAT, [None, n])
    out_shape = _output_shape(graph, x, n, shapes, matmul)
    unflatten = graph.add_op("Reshape", [y2, out_shape], [f"{result.name}_nd"], after=gemm)
    y = graph.outputs_of(unflatten)[0]
    y.type = result.type
    graph.remove_op(add, remove_outputs=False)
    graph.replace_all_uses(result, y)
    graph.remove_value(result)
    graph.remove_op(matmul)
    graph.rename_value(y, result.name)  # downstream names (and graph outputs) are unchanged


def _output_shape(graph: Graph, x: Value, n: int, shapes: dict[str, Value], near: Op) -> Value:
    """shape(x)[:-1] + [n], built once per (x, n)."""
    key = f"{x.name}|{n}"
    if key in shapes:
        return shapes[key]
    static = x.shape
    if static is not None and all(isinstance(d, int) and d > 0 for d in static[:-1]):
        value = graph.add_constant(f"{x.name}_shape_{n}", np.array([*static[:-1], n], np.int64))
    else:
        shape = graph.add_op("Shape", [x], [f"{x.name}_shape"], attrs={"end": -1}, before=near)
        tail = graph.add_constant(f"{x.name}_width_{n}", np.array([n], np.int64))
        concat = graph.add_op("Concat", [graph.outputs_of(shape)[0], tail], [f"{x.name}_shape_{n}"],
                              attrs={"axis": 0}, before=near)
        value = graph.outputs_of(concat)[0]
    shapes[key] = value
    return value
