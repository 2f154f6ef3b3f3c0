"""Quantized linear layers and their groups: which MatMul/Gemm ops weight rounding (GPTQ, AWQ)
may rewrite, seen as y = x W with W in [K, N] layout (K = reduction axis), grouped by the
activation they read.

Linears that share an input (q/k/v, gate/up) share one input Hessian (see
`edgeq.calibration.layer_inputs`): `linear_groups` groups them, looking through reshapes that
keep the channel axis last.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeq.ir import Graph, Op
from edgeq.quant.plan import QuantPlan, is_float
from edgeq.quant.sharing import is_private_constant
from edgeq.targets.base import QSpec


@dataclass
class Linear:
    """One quantized linear layer: y = x @ W with W seen as [K, N] (K = reduction axis)."""

    op: Op
    spec: QSpec             # the plan's weight spec (slot 1)
    transposed: bool        # the stored weight is [N, K] (Gemm transB=1)

    def weight_kn(self, graph: Graph) -> np.ndarray:
        w = graph.constant(graph.inputs_of(self.op)[1]).numpy().astype(np.float32)
        return w.T if self.transposed else w

    def set_weight_kn(self, graph: Graph, w_kn: np.ndarray) -> None:
        value = graph.inputs_of(self.op)[1]
        dtype = graph.constant(value).numpy().dtype
        w = w_kn.T if self.transposed else w_kn
        graph.set_const(value, np.ascontiguousarray(w).astype(dtype))

    def to_stored(self, q: np.ndarray, scale: np.ndarray, zero: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(q, scale, zero) computed in [K, N] layout, in the stored weight's layout
        (the shapes `quantize_weight` gives for the plan's spec and `weight_key`'s axes)."""
        if not self.transposed:
            return q, scale, zero
        if scale.ndim == 2:  # blocks: [G, N] -> [N, G]
            return np.ascontiguousarray(q.T), np.ascontiguousarray(scale.T), np.ascontiguousarray(zero.T)
        return np.ascontiguousarray(q.T), scale, zero


@dataclass
class LinearGroup:
    """Quantized linears reading one activation `source` (they share one Hessian). A linear
    may read it through reshapes that keep the channel axis last (linear-to-gemm's flatten to
    2-D): `readers` are the ops reading `source` itself (the linears or those reshapes)."""

    source: str
    linears: list[Linear] = field(default_factory=list)
    readers: list[Op] = field(default_factory=list)

    @property
    def ops(self) -> list[Op]:
        return [lin.op for lin in self.linears]


# Ops that keep every row of channels intact when the channel axis stays last.
_ROW_PRESERVING = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


def _channel_source(graph: Graph, value, width: int):
    """Walk up from a linear's input through reshapes that keep `width` channels last."""
    reader = None
    while True:
        producer = graph.producer(value)
        if producer is None or producer.domain or producer.op_type not in _ROW_PRESERVING:
            return value, reader
        data = graph.inputs_of(producer)[0]
        if data is None or graph.is_const(data) or not _last_dim_is(data, width) or not _last_dim_is(value, width):
            return value, reader
        value, reader = data, producer


def _last_dim_is(value, width: int) -> bool:
    shape = value.shape
    return bool(shape) and shape[-1] == width


def linear_groups(graph: Graph, plan: QuantPlan) -> tuple[list[LinearGroup], dict[str, str]]:
    """Quantized MatMul/Gemm layers with a private 2-D float weight in slot 1, grouped by the
    activation they read, in graph order; and {op name: why it was left out} for the others
    (those keep round-to-nearest)."""
    groups: dict[str, LinearGroup] = {}
    skipped: dict[str, str] = {}
    for op_plan in plan.ops:
        op = op_plan.op
        if op.op_type not in ("MatMul", "Gemm") or op.domain or 1 not in op_plan.weights:
            continue
        ins = graph.inputs_of(op)
        weight = ins[1]
        tensor = graph.constant(weight)
        reason = None
        if op.op_type == "Gemm" and op.attr("transA", 0):
            reason = "Gemm with transA"
        elif tensor is None or len(tensor.dims) != 2 or weight.const is None:
            reason = "weight is not a 2-D initializer"
        elif not is_private_constant(graph, weight, op):
            reason = "weight shared with other ops, or a graph input or output"
        elif ins[0] is None or graph.is_const(ins[0]) or not is_float(ins[0]):
            reason = "input is not a float activation"
        if reason:
            skipped[op.name] = reason
            continue
        transposed = op.op_type == "Gemm" and bool(op.attr("transB", 0))
        width = int(tensor.dims[1] if transposed else tensor.dims[0])
        source, reader = _channel_source(graph, ins[0], width)
        group = groups.setdefault(source.name, LinearGroup(source.name))
        group.linears.append(Linear(op, op_plan.weights[1], transposed))
        reader = reader or op
        if reader not in group.readers:
            group.readers.append(reader)
    order = {op: i for i, op in enumerate(graph.topo_order())}
    return sorted(groups.values(), key=lambda g: order[g.linears[0].op]), skipped
