"""RMSNorm -> `Mul(gamma, Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2.0), axes=[-1], keepdims=1),
eps)))))` (edgeq's builder form, models/blocks.py `rms_norm`; ReduceMean's axes as the opset
writes them).

From: `Div(x, Sqrt(.))`, `Mul(x, Div(1, Sqrt(.)))`, `Mul(x, Pow(., -0.5))`, `Mul(x, x)` for
`Pow(x, 2)`, either operand order of every Mul/Add, gamma on either side, `SimplifiedLayerNormalization`
(ONNX Runtime registers it in the ONNX domain; com.microsoft too), com.microsoft
`SkipSimplifiedLayerNormalization` (-> `Add` then RMSNorm) and opset-23 `RMSNormalization`.
"""

from __future__ import annotations

import numpy as np

from edgeq.frontend.rules.base import (Builder, Match, Rule, array, detach, inner_values_owned, is_scalar,
                                       last_axis_only, other, out, rank_of, reduce_axes, scalar,
                                       vector_for_last_axis)
from edgeq.frontend.rules.layer_norm import _check_extra_outputs, _residual_sum
from edgeq.frontend.rules.probe import block_function, norm_probe
from edgeq.ir import Graph, Op, Value

MS = "com.microsoft"


def build_rms_norm(graph: Graph, b: Builder, x: Value, gamma: Value | None, eps: float, y: Value) -> None:
    """The canonical chain, writing `y`."""
    dtype = np.float16 if x.elem_type == 10 else np.float32
    square = b.op("Pow", x, b.const("two", 2.0, dtype))
    mean = b.axes("ReduceMean", square, [-1], keepdims=1)
    std = b.op("Sqrt", b.op("Add", mean, b.const("epsilon", eps, dtype)))
    if gamma is None:
        b.op("Mul", x, b.op("Reciprocal", std), out=y)
        return
    normed = b.op("Mul", x, b.op("Reciprocal", std))
    data = array(graph, gamma)
    if data is not None and data.ndim != 1 and vector_for_last_axis(graph, gamma) is not None:
        gamma = b.const("gamma", vector_for_last_axis(graph, gamma), data.dtype)
    b.op("Mul", gamma, normed, out=y)


class DecomposedRMSNorm(Rule):
    name = "rms-norm-decomposed"
    roots = frozenset({"ReduceMean"})

    def match(self, graph: Graph, op: Op) -> Match | None:
        square = graph.producer(graph.inputs_of(op)[0]) if graph.inputs_of(op)[0] is not None else None
        if square is None or square.domain:
            return None
        sq_ins = graph.inputs_of(square)
        if square.op_type == "Pow" and is_scalar(graph, sq_ins[1], 2.0):
            x = sq_ins[0]
        elif square.op_type == "Mul" and sq_ins[0] is sq_ins[1]:
            x = sq_ins[0]
        else:
            return None
        if x is None or not last_axis_only(reduce_axes(graph, op), rank_of(x)) or op.attr("keepdims", 1) != 1:
            return None
        mean = out(graph, op)
        add = graph.consumers(mean)
        if len(add) != 1 or add[0].op_type != "Add" or add[0].domain:
            return None
        add = add[0]
        eps = scalar(graph, other(graph, add, mean))
        if eps is None:
            return None
        chain = _normalize(graph, out(graph, add), x)
        if chain is None:
            return None
        ops = [square, op, add, *chain]
        normed = out(graph, chain[-1])
        y, gamma = normed, None
        readers = graph.consumers(normed)
        if len(readers) == 1 and not graph.is_graph_output(normed) and readers[0].op_type == "Mul":
            g = other(graph, readers[0], normed)
            if g is not None and vector_for_last_axis(graph, g) is not None:
                ops.append(readers[0])
                y, gamma = out(graph, readers[0]), g
        found = Match(op, ops, {"x": x, "y": y, "gamma": gamma}, {"epsilon": eps})
        return None if _is_canonical(graph, found) else found

    def check(self, graph: Graph, match: Match) -> str | None:
        if not inner_values_owned(graph, match.ops, [match["y"]]):
            return "an intermediate value is read outside the RMSNorm"
        gamma = match["gamma"]
        shape = match["x"].shape
        width = (vector_for_last_axis(graph, gamma).size if gamma is not None
                 else shape[-1] if shape and isinstance(shape[-1], int) else 16)
        probe = norm_probe(int(width))
        got = block_function(graph, match.ops, match["x"], match["y"], probe)
        want = probe / np.sqrt((probe**2).mean(-1, keepdims=True) + match.params["epsilon"])
        if gamma is not None:
            want = want * vector_for_last_axis(graph, gamma)
        if got is None or not np.allclose(got, want, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(want).max())):
            return "the matched ops do not compute RMSNorm over the last axis"
        return None

    def rewrite(self, graph: Graph, match: Match) -> None:
        b = Builder(graph, match.ops[-1])
        y = match["y"]
        detach(graph, graph.producer(y))
        build_rms_norm(graph, b, match["x"], match["gamma"], match.params["epsilon"], y)


def _normalize(graph: Graph, var_eps: Value, x: Value) -> list[Op] | None:
    """From var+eps to x normalized: Sqrt -> Reciprocal | Div(1, .) -> Mul(x, .); Sqrt -> Div(x, .);
    Pow(., -0.5) -> Mul(x, .)."""
    readers = graph.consumers(var_eps)
    if len(readers) != 1 or readers[0].domain:
        return None
    first = readers[0]
    if first.op_type == "Pow" and is_scalar(graph, graph.inputs_of(first)[1], -0.5):
        mul = _single(graph, out(graph, first))
        return [first, mul] if mul is not None and mul.op_type == "Mul" and other(graph, mul, out(graph, first)) is x \
            else None
    if first.op_type != "Sqrt":
        return None
    std = out(graph, first)
    nxt = _single(graph, std)
    if nxt is None:
        return None
    if nxt.op_type == "Div" and graph.inputs_of(nxt) == [x, std]:
        return [first, nxt]
    if nxt.op_type == "Reciprocal" or (nxt.op_type == "Div" and graph.inputs_of(nxt)[1] is std
                                       and is_scalar(graph, graph.inputs_of(nxt)[0], 1.0)):
        mul = _single(graph, out(graph, nxt))
        if mul is not None and mul.op_type == "Mul" and other(graph, mul, out(graph, nxt)) is x:
            return [first, nxt, mul]
    return None


def _single(graph: Graph, value: Value) -> Op | None:
    readers = graph.consumers(value)
    return readers[0] if len(readers) == 1 and not graph.is_graph_output(value) and not readers[0].domain else None


def _is_canonical(graph: Graph, match: Match) -> bool:
    square, _, add, *rest = match.ops
    x = match["x"]
    if square.op_type != "Pow" or graph.inputs_of(add)[0] is not out(graph, match.ops[1]):
        return False
    if [op.op_type for op in rest[:3]] != ["Sqrt", "Reciprocal", "Mul"] or graph.inputs_of(rest[2])[0] is not x:
        return False
    if match["gamma"] is None:
        return len(rest) == 3
    gamma_mul = rest[3]
    data = array(graph, match["gamma"])
    return graph.inputs_of(gamma_mul)[0] is match["gamma"] and data.ndim == 1


class FusedRMSNorm(Rule):
    """SimplifiedLayerNormalization (ONNX Runtime, either domain) and opset-23 RMSNormalization."""

    name = "rms-norm-fused"
    roots = frozenset({"SimplifiedLayerNormalization", f"{MS}::SimplifiedLayerNormalization", "RMSNormalization"})

    def match(self, graph: Graph, op: Op) -> Match | None:
        ins = graph.inputs_of(op)
        outs = graph.outputs_of(op)
        return Match(op, [op], {"x": ins[0], "gamma": ins[1], "y": outs[0]},
                     {"axis": op.attr("axis", -1), "epsilon": op.attr("epsilon", 1e-5), "extra": outs[1:]})

    def check(self, graph: Graph, match: Match) -> str | None:
        axis, rank = match.params["axis"], rank_of(match["x"])
        if axis != -1 and (rank is None or axis != rank - 1):
            return f"it normalizes from axis {axis}, not the last axis only"
        if vector_for_last_axis(graph, match["gamma"]) is None:
            return "its scale is not a constant vector over the last axis"
        return _check_extra_outputs(graph, match.params["extra"])

    def rewrite(self, graph: Graph, match: Match) -> None:
        b = Builder(graph, match.root)
        detach(graph, match.root)
        build_rms_norm(graph, b, match["x"], match["gamma"], match.params["epsilon"], match["y"])


class SkipRMSNorm(Rule):
    name = "rms-norm-skip"
    roots = frozenset({f"{MS}::SkipSimplifiedLayerNormalization"})

    def match(self, graph: Graph, op: Op) -> Match | None:
        ins = graph.inputs_of(op) + [None] * 4
        outs = graph.outputs_of(op) + [None] * 4
        return Match(op, [op], {"x": ins[0], "skip": ins[1], "gamma": ins[2], "bias": ins[3], "y": outs[0],
                                "sum": outs[3]}, {"epsilon": op.attr("epsilon", 1e-5), "extra": outs[1:3]})

    def check(self, graph: Graph, match: Match) -> str | None:
        if vector_for_last_axis(graph, match["gamma"]) is None:
            return "its scale is not a constant vector over the last axis"
        return _check_extra_outputs(graph, match.params["extra"])

    def rewrite(self, graph: Graph, match: Match) -> None:
        b = Builder(graph, match.root)
        detach(graph, match.root)
        summed = _residual_sum(graph, b, match["x"], match["skip"], match["bias"], match["sum"])
        build_rms_norm(graph, b, summed, match["gamma"], match.params["epsilon"], match["y"])


RULES = (DecomposedRMSNorm(), FusedRMSNorm(), SkipRMSNorm())
