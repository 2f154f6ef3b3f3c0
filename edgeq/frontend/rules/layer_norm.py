"""LayerNorm -> `LayerNormalization(x, gamma, beta, axis=-1, epsilon=e)` (ONNX domain, opset 17+).

From: the decomposed form (ReduceMean, Sub, Pow 2 or Mul(d, d), ReduceMean, Add eps, Sqrt, Div
or Mul by Reciprocal, or Pow -0.5; then Mul gamma, Add beta, in any operand order), com.microsoft
`LayerNormalization`, and com.microsoft `SkipLayerNormalization(x, skip, gamma, beta?, bias?)`:
`Add(x, skip)` [+ bias] then `LayerNormalization`, its 4th output (the sum) being the last Add's.
When x is a linear layer's MatMul that ONNX Runtime's optimizer took the bias off, the bias goes
back onto it (`Add(MatMul, bias)` then `Add(., skip)`, as torch.onnx writes the unfused layer),
so that passes see a linear layer with its bias and a residual add.
"""

from __future__ import annotations

import numpy as np

from edgeq.frontend.rules.base import (Builder, Match, Rule, array, detach, inner_values_owned, is_scalar,
                                       last_axis_only, opset, other, out, producer, rank_of, reduce_axes, scalar,
                                       vector_for_last_axis)
from edgeq.frontend.rules.probe import block_function, norm_probe
from edgeq.ir import Graph, Op, Value

MS = "com.microsoft"


def _affine_tail(graph: Graph, value: Value, ops: list[Op]) -> tuple[Value, Value | None, Value | None]:
    """Follow `value` through Mul(., gamma) and Add(., beta) with constant last-axis vectors;
    returns (output, gamma, beta) and extends `ops`."""
    gamma = beta = None
    readers = graph.consumers(value)
    if len(readers) == 1 and not graph.is_graph_output(value):
        mul = readers[0]
        g = other(graph, mul, value) if mul.op_type == "Mul" and not mul.domain else None
        if g is not None and vector_for_last_axis(graph, g) is not None:
            ops.append(mul)
            gamma, value = g, out(graph, mul)
    readers = graph.consumers(value)
    if len(readers) == 1 and not graph.is_graph_output(value):
        add = readers[0]
        b = other(graph, add, value) if add.op_type == "Add" and not add.domain else None
        if b is not None and vector_for_last_axis(graph, b) is not None:
            ops.append(add)
            beta, value = b, out(graph, add)
    return value, gamma, beta


def _vector(builder: Builder, graph: Graph, value: Value | None, name: str) -> Value | None:
    """`value` itself when it is already a [D] constant, else a new [D] constant of its data."""
    if value is None:
        return None
    data = array(graph, value)
    if data.ndim == 1:
        return value
    return builder.const(name, vector_for_last_axis(graph, value), data.dtype)


class DecomposedLayerNorm(Rule):
    name = "layer-norm-decomposed"
    roots = frozenset({"ReduceMean"})

    def match(self, graph: Graph, op: Op) -> Match | None:
        x = graph.inputs_of(op)[0]
        if x is None or not last_axis_only(reduce_axes(graph, op), rank_of(x)) or op.attr("keepdims", 1) != 1:
            return None
        mean = out(graph, op)
        sub = next((r for r in graph.consumers(mean) if r.op_type == "Sub" and graph.inputs_of(r) == [x, mean]),
                   None)
        if sub is None:
            return None
        d = out(graph, sub)
        readers = graph.consumers(d)
        if len(readers) != 2 or graph.is_graph_output(d):
            return None
        square = next((r for r in readers if (r.op_type == "Pow" and graph.inputs_of(r)[0] is d
                                              and is_scalar(graph, graph.inputs_of(r)[1], 2.0))
                       or (r.op_type == "Mul" and graph.inputs_of(r) == [d, d])), None)
        if square is None:
            return None
        normalize = next(r for r in readers if r is not square)
        reduce2 = graph.consumers(out(graph, square))
        if len(reduce2) != 1 or reduce2[0].op_type != "ReduceMean":
            return None
        var = reduce2[0]
        if not last_axis_only(reduce_axes(graph, var), rank_of(x)) or var.attr("keepdims", 1) != 1:
            return None
        add = graph.consumers(out(graph, var))
        if len(add) != 1 or add[0].op_type != "Add":
            return None
        add = add[0]
        eps = scalar(graph, other(graph, add, out(graph, var)))
        if eps is None:
            return None
        chain = _inverse_std(graph, out(graph, add), d, normalize)
        if chain is None:
            return None
        ops = [op, sub, square, var, add, *chain]
        y, gamma, beta = _affine_tail(graph, out(graph, chain[-1]), ops)
        return Match(op, ops, {"x": x, "y": y, "gamma": gamma, "beta": beta}, {"epsilon": eps})

    def check(self, graph: Graph, match: Match) -> str | None:
        if opset(graph) < 17:
            return f"LayerNormalization needs opset 17 (the graph has {opset(graph)})"
        if not inner_values_owned(graph, match.ops, [match["y"]]):
            return "an intermediate value is read outside the LayerNorm"
        width = _width(graph, match)
        if width is None:
            return "the normalized width is unknown"
        probe = norm_probe(width)
        got = block_function(graph, match.ops, match["x"], match["y"], probe)
        gamma = np.ones(width) if match["gamma"] is None else vector_for_last_axis(graph, match["gamma"])
        beta = np.zeros(width) if match["beta"] is None else vector_for_last_axis(graph, match["beta"])
        centred = probe - probe.mean(-1, keepdims=True)
        want = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + match.params["epsilon"]) * gamma + beta
        if got is None or not np.allclose(got, want, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(want).max())):
            return "the matched ops do not compute LayerNorm over the last axis"
        return None

    def rewrite(self, graph: Graph, match: Match) -> None:
        b = Builder(graph, match.ops[-1])
        width = _width(graph, match)
        dtype = np.float16 if match["x"].elem_type == 10 else np.float32
        gamma = _vector(b, graph, match["gamma"], "gamma") or b.const("gamma", np.ones(width), dtype)
        beta = _vector(b, graph, match["beta"], "beta")
        y = match["y"]
        detach(graph, graph.producer(y))
        b.op("LayerNormalization", match["x"], gamma, beta, out=y, axis=-1, epsilon=match.params["epsilon"])


def _width(graph: Graph, match: Match) -> int | None:
    for name in ("gamma", "beta"):
        if match[name] is not None:
            return int(vector_for_last_axis(graph, match[name]).size)
    shape = match["x"].shape
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def _inverse_std(graph: Graph, var_eps: Value, d: Value, normalize: Op) -> list[Op] | None:
    """The ops from var+eps to the normalized value: Sqrt then Div(d, .), or Sqrt, Reciprocal
    (or Div(1, .)) then Mul(d, .), or Pow(., -0.5) then Mul(d, .). `normalize` is d's other reader."""
    readers = graph.consumers(var_eps)
    if len(readers) != 1:
        return None
    first = readers[0]
    if first.op_type == "Sqrt":
        std = out(graph, first)
        if normalize.op_type == "Div" and graph.inputs_of(normalize) == [d, std]:
            return [first, normalize]
        inv = graph.consumers(std)
        if len(inv) != 1:
            return None
        inv = inv[0]
        if not (inv.op_type == "Reciprocal" or (inv.op_type == "Div" and graph.inputs_of(inv)[1] is std
                                                and is_scalar(graph, graph.inputs_of(inv)[0], 1.0))):
            return None
        if normalize.op_type == "Mul" and other(graph, normalize, d) is out(graph, inv):
            return [first, inv, normalize]
        return None
    if first.op_type == "Pow" and is_scalar(graph, graph.inputs_of(first)[1], -0.5):
        if normalize.op_type == "Mul" and other(graph, normalize, d) is out(graph, first):
            return [first, normalize]
    return None


class MicrosoftLayerNorm(Rule):
    """com.microsoft LayerNormalization: the ONNX op under another domain."""

    name = "layer-norm-com-microsoft"
    roots = frozenset({f"{MS}::LayerNormalization"})

    def match(self, graph: Graph, op: Op) -> Match | None:
        ins = graph.inputs_of(op)
        outs = graph.outputs_of(op)
        return Match(op, [op], {"x": ins[0], "gamma": ins[1], "beta": ins[2] if len(ins) > 2 else None,
                                "y": outs[0]},
                     {"axis": op.attr("axis", -1), "epsilon": op.attr("epsilon", 1e-5), "extra": outs[1:]})

    def check(self, graph: Graph, match: Match) -> str | None:
        return _check_extra_outputs(graph, match.params["extra"]) or _check_axis(match)

    def rewrite(self, graph: Graph, match: Match) -> None:
        b = Builder(graph, match.root)
        detach(graph, match.root)
        b.op("LayerNormalization", match["x"], match["gamma"], match["beta"], out=match["y"], axis=-1,
             epsilon=match.params["epsilon"])


class SkipLayerNorm(Rule):
    name = "layer-norm-skip"
    roots = frozenset({f"{MS}::SkipLayerNormalization"})

    def match(self, graph: Graph, op: Op) -> Match | None:
        ins = graph.inputs_of(op) + [None] * 5
        outs = graph.outputs_of(op) + [None] * 4
        return Match(op, [op], {"x": ins[0], "skip": ins[1], "gamma": ins[2], "beta": ins[3], "bias": ins[4],
                                "y": outs[0], "sum": outs[3]},
                     {"epsilon": op.attr("epsilon", 1e-12), "extra": outs[1:3]})

    def check(self, graph: Graph, match: Match) -> str | None:
        if opset(graph) < 17:
            return f"LayerNormalization needs opset 17 (the graph has {opset(graph)})"
        return _check_extra_outputs(graph, match.params["extra"])

    def rewrite(self, graph: Graph, match: Match) -> None:
        b = Builder(graph, match.root)
        x, skip, bias, total = match["x"], match["skip"], match["bias"], match["sum"]
        detach(graph, match.root)
        summed = _residual_sum(graph, b, x, skip, bias, total)
        b.op("LayerNormalization", summed, match["gamma"], match["beta"], out=match["y"], axis=-1,
             epsilon=match.params["epsilon"])


def _residual_sum(graph: Graph, b: Builder, x: Value, skip: Value, bias: Value | None,
                  total: Value | None) -> Value:
    """x + skip (+ bias), the bias first when x is a linear layer's MatMul read only here."""
    if bias is None:
        return b.op("Add", x, skip, out=total)
    linear = producer(graph, x, "MatMul")
    if linear is not None and graph.is_const(graph.inputs_of(linear)[1]) and len(graph.consumers(x)) == 0:
        return b.op("Add", b.op("Add", x, bias), skip, out=total)
    return b.op("Add", b.op("Add", x, skip), bias, out=total)


def _check_extra_outputs(graph: Graph, outputs: list[Value | None]) -> str | None:
    for value in outputs:
        if value is not None and (graph.consumers(value) or graph.is_graph_output(value)):
            return f"its mean/inverse-std output '{value.name}' is read"
    return None


def _check_axis(match: Match) -> str | None:
    axis = match.params.get("axis", -1)
    rank = rank_of(match["x"]) if match["x"] is not None else None
    if axis != -1 and (rank is None or axis != rank - 1):
        return f"it normalizes from axis {axis}, not the last axis only"
    return None


class LayerNormAxis(Rule):
    """`LayerNormalization(axis=rank-1)` -> `axis=-1`."""

    name = "layer-norm-axis"
    roots = frozenset({"LayerNormalization"})

    def match(self, graph: Graph, op: Op) -> Match | None:
        rank = rank_of(graph.inputs_of(op)[0])
        axis = op.attr("axis", -1)
        return Match(op, [op]) if axis != -1 and rank is not None and axis == rank - 1 else None

    def rewrite(self, graph: Graph, match: Match) -> None:
        match.root.set_attr("axis", -1)


RULES = (DecomposedLayerNorm(), MicrosoftLayerNorm(), SkipLayerNorm(), LayerNormAxis())
