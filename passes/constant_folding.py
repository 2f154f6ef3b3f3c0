"""Fold ops whose inputs are all constant, and Shape/Size of statically shaped values.

Evaluation is onnx's reference implementation (`onnx.reference.ReferenceEvaluator`) run on a
one-node model, so every op's semantics come from onnx itself, not from code here.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from onnx.reference import ReferenceEvaluator

from edgeq.ir import Graph, Op, Tensor
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.registry import register_pass

# Ops that must never be folded: random, or with state/side effects, or control flow.
_NEVER_FOLD = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
               "Bernoulli", "If", "Loop", "Scan", "Dropout", "QuantizeLinear", "DequantizeLinear"}


@register_pass
class ConstantFolding(Pass):
    name = "constant-folding"
    description = "fold constant subgraphs (incl. Shape of static shapes) and Constant nodes into initializers"

    def __init__(self, max_output_bytes: int = 64 << 20, fold_weights: bool = True):
        self.max_output_bytes = max_output_bytes
        # When False, only shape-sized work is folded (outputs up to 64 KiB): weights stay as exported.
        self.fold_weights = fold_weights

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        folded = constants = 0
        limit = self.max_output_bytes if self.fold_weights else 1 << 16
        # An initializer that is also a graph input is only a default: the caller may feed
        # another value, so nothing computed from it is constant.
        overridable = {id(v) for v in graph.inputs if v.const is not None}
        for op in graph.topo_order():
            if op.domain or op.subgraphs or op.op_type in _NEVER_FOLD:
                continue
            if op.op_type == "Constant":
                if self._constant_to_initializer(graph, op):
                    constants += 1
                continue
            if any(graph.is_graph_output(v) for v in graph.outputs_of(op) if v is not None):
                continue  # the output must stay an op's output under its name: nothing to fold
            arrays = self._static_inputs(graph, op, overridable)
            if arrays is None:
                continue
            outputs = _evaluate(op, arrays, graph)
            if outputs is None or sum(o.nbytes for o in outputs) > limit:
                continue
            self._replace_with_constants(graph, op, outputs)
            folded += 1
        return PassResult(graph, bool(folded or constants),
                          {"ops_folded": folded, "constant_nodes_to_initializers": constants})

    @staticmethod
    def _static_inputs(graph: Graph, op: Op, overridable: set[int]) -> list[np.ndarray | None] | None:
        ins = graph.inputs_of(op)
        if any(v is not None and id(v) in overridable for v in ins):
            return None
        if op.op_type in ("Shape", "Size") and ins[0] is not None and graph.constant(ins[0]) is None:
            shape = ins[0].shape
            if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
                return None
            # Only the shape matters: evaluate on a zero-strided stand-in, never on real data.
            return [np.broadcast_to(np.zeros((), np.float32), shape)]
        arrays = []
        for value in ins:
            if value is None:
                arrays.append(None)
                continue
            tensor = graph.constant(value)
            if tensor is None:
                return None
            arrays.append(tensor.numpy())
        return arrays

    @staticmethod
    def _constant_to_initializer(graph: Graph, op: Op) -> bool:
        out = graph.outputs_of(op)[0]
        tensor = graph.constant(out)
        if tensor is None or graph.is_graph_output(out):
            return False
        graph.remove_op(op, remove_outputs=False)
        # The Value object stays (readers hold it) and becomes an initializer.
        out.const = tensor
        graph.initializers.append(out)
        return True

    @staticmethod
    def _replace_with_constants(graph: Graph, op: Op, outputs: list[np.ndarray]) -> None:
        values = graph.outputs_of(op)
        graph.remove_op(op, remove_outputs=False)
        for value, array in zip(values, outputs):
            if value is None:
                continue
            # np.ascontiguousarray makes a 0-d result 1-d; the reshape keeps scalars scalars.
            value.const = Tensor.from_array(np.ascontiguousarray(array).reshape(array.shape))
            graph.initializers.append(value)


def _evaluate(op: Op, arrays: list[np.ndarray | None], graph: Graph) -> list[np.ndarray] | None:
    in_names = [f"i{k}" if a is not None else "" for k, a in enumerate(arrays)]
    out_values = graph.outputs_of(op)
    out_names = [f"o{k}" if v is not None else "" for k, v in enumerate(out_values)]
    node = helper.make_node(op.op_type, in_names, out_names, **{})
    node.attribute.extend(op.attributes.values())
    opset = (graph.model.opset_imports.get("", 21) if graph.model else 21)
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
              for n, a in zip(in_names, arrays) if a is not None]
    outputs = [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in out_names if n]
    model = helper.make_model(helper.make_graph([node], "fold", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", opset)])
    try:
        results = ReferenceEvaluator(model).run(None, {n: a for n, a in zip(in_names, arrays) if a is not None})
    except Exception:
        return None  # not foldable by the reference (unsupported op or dtype): leave it
    return [np.asarray(r) for r in results]
