"""Folding per-channel factors into the weights around an activation (SmoothQuant, AWQ).

The rule shape follows onnxscript's rewrite rules: a fold checks that it is exact and that the
constants it changes are private to the match (`edgeq.quant.sharing`), and refuses otherwise.
"""

from __future__ import annotations

import numpy as np

from edgeq.ir import Graph, Op, Value
from edgeq.quant.sharing import is_owned_by_match, is_private_constant


def fold_channel_scale_into_producer(graph: Graph, source: Value, ops: list[Op], inv: np.ndarray) -> bool:
    """Scale the producer of `source` by inv per last-axis channel, if that is exact and safe."""
    if not is_owned_by_match(graph, source, ops):
        return False
    producer = graph.producer(source)
    if producer is None:
        return False
    ins = graph.inputs_of(producer)
    if producer.op_type == "LayerNormalization" and producer.attr("axis", -1) == -1:
        gamma, beta = ins[1], ins[2] if len(ins) > 2 else None
        if not is_private_constant(graph, gamma, producer) or (
                beta is not None and not is_private_constant(graph, beta, producer)):
            return False
        graph.set_const(gamma, gamma.const.numpy() * inv)
        if beta is not None:
            graph.set_const(beta, beta.const.numpy() * inv)
        return True
    if producer.op_type == "Mul":  # RMSNorm's gamma (or any per-channel constant scale)
        const_slot = next((i for i, v in enumerate(ins) if is_private_constant(graph, v, producer)), None)
        if const_slot is None:
            return False
        gamma = ins[const_slot].const.numpy()
        if gamma.ndim == 0 or gamma.shape[-1] != inv.shape[0]:
            return False
        graph.set_const(ins[const_slot], (gamma * inv).astype(gamma.dtype))
        return True
    if producer.op_type == "Add":  # bias of a preceding linear: MatMul(a, W) + b
        const_slot = next((i for i, v in enumerate(ins) if is_private_constant(graph, v, producer)), None)
        if const_slot is None:
            return False
        other = graph.producer(ins[1 - const_slot])
        if other is None or other.op_type != "MatMul":
            return False
        w = graph.inputs_of(other)[1]
        mm_out = graph.outputs_of(other)[0]
        if not is_private_constant(graph, w, other) or not is_owned_by_match(graph, mm_out, [producer]):
            return False
        graph.set_const(ins[const_slot], ins[const_slot].const.numpy() * inv)
        graph.set_const(w, w.const.numpy() * inv[None, :])
        return True
    return False


def insert_channel_mul(graph: Graph, source: Value, ops: list[Op], inv: np.ndarray) -> None:
    factor = graph.add_constant(f"{source.name}_smooth_inv_scale", inv.astype(np.float32))
    first = min(ops, key=lambda op: op.order)
    mul = graph.add_op("Mul", [source, factor], [f"{source.name}_smoothed"], before=first)
    out = graph.outputs_of(mul)[0]
    out.type = source.type
    for op in ops:
        graph.set_input(op, 0, out)
