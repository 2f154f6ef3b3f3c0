"""Fold a scalar Mul/Div that follows a quantized MatMul into its input's dequantization scale.

MatMul(DQ(q, s, z), B) / c == MatMul(DQ(q, s / c, z), B): attention's 1/sqrt(d) then costs
nothing, since ORT's integer MatMul kernels apply the scales anyway. Only when that DQ is read
by this MatMul alone and the MatMul's output by the Mul/Div alone.
"""

from __future__ import annotations

import numpy as np

from edgeq.ir import Graph, Op
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.registry import register_pass


@register_pass
class FoldScalarIntoDequantize(Pass):
    name = "fold-scalar-into-dequantize"
    description = "fold a scalar Mul/Div after a quantized MatMul into the input's DequantizeLinear scale"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        folded = 0
        for op in graph.topo_order():
            if op.op_type == "MatMul" and not op.domain and self._fold(graph, op):
                folded += 1
        return PassResult(graph, folded > 0, {"folded": folded})

    @staticmethod
    def _fold(graph: Graph, matmul: Op) -> bool:
        out = graph.outputs_of(matmul)[0]
        readers = graph.consumers(out)
        if len(readers) != 1 or graph.is_graph_output(out):
            return False
        scaler = readers[0]
        if scaler.op_type not in ("Mul", "Div") or scaler.domain:
            return False
        ins = graph.inputs_of(scaler)
        const_slot = 1 if graph.is_const(ins[1]) else 0 if scaler.op_type == "Mul" and graph.is_const(ins[0]) else None
        if const_slot is None or ins[1 - const_slot] is not out:
            return False
        factor = graph.constant(ins[const_slot]).numpy()
        if factor.size != 1 or not np.isfinite(factor).all() or float(factor) == 0.0:
            return False
        factor = float(factor.reshape(()))
        dq = graph.producer(graph.inputs_of(matmul)[0])
        if dq is None or dq.op_type != "DequantizeLinear" or len(graph.consumers(graph.outputs_of(dq)[0])) != 1:
            return False
        dq_ins = graph.inputs_of(dq)
        scale = graph.constant(dq_ins[1])
        if scale is None or scale.numpy().size != 1:
            return False
        multiplier = factor if scaler.op_type == "Mul" else 1.0 / factor
        new_scale = graph.add_constant(f"{dq_ins[1].name}_folded",
                                       (scale.numpy().astype(np.float64) * multiplier).astype(scale.dtype))
        graph.set_input(dq, 1, new_scale)
        result = graph.outputs_of(scaler)[0]
        graph.remove_op(scaler, remove_outputs=False)
        graph.replace_all_uses(result, out)
        if out.type is None and result.type is not None:
            out.type = result.type
        graph.remove_value(result)
        return True
