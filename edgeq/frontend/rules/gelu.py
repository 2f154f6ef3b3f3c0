"""GELU -> `Gelu(x, approximate="none")` or `Gelu(x, approximate="tanh")` (ONNX opset 20).

From: the Erf form `x * 0.5 * (1 + Erf(x / sqrt2))` and the tanh form
`0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))` with their multiplications in any
order and grouping (x^3 as Pow or as products), com.microsoft `Gelu`, `FastGelu(x, bias?)`
(tanh) and `BiasGelu(x, bias)` (-> `Add(x, bias)` then `Gelu`). The formula forms are matched by
structure, then checked numerically: the block must compute GELU on probe values (like the FPGA
lowering's `gelu_block_io`), so a formula of the same shape with other constants is left alone.
"""

from __future__ import annotations

import numpy as np

from edgeq.frontend.rules.base import (Builder, Match, Rule, detach, inner_values_owned, is_scalar, opset, other,
                                       out, scalar)
from edgeq.frontend.rules.probe import block_function, gelu_reference
from edgeq.ir import Graph, Op, Value

MS = "com.microsoft"
_ELEMENTWISE = frozenset({"Mul", "Div", "Add", "Sub", "Pow"})
_MAX_INNER_OPS = 8
PROBE = np.linspace(-6.0, 6.0, 97)


def _single(graph: Graph, value: Value, op_type: str) -> Op | None:
    readers = graph.consumers(value)
    if len(readers) != 1 or graph.is_graph_output(value):
        return None
    return readers[0] if readers[0].op_type == op_type and not readers[0].domain else None


def _product(graph: Graph, a: Value) -> tuple[Value, list[Op], Value] | None:
    """(x, ops, y) for y = x * 0.5 * a in any grouping: Mul(Mul(x, a), 0.5), Mul(Mul(a, 0.5), x),
    Mul(Mul(x, 0.5), a)."""
    m1 = _single(graph, a, "Mul")
    if m1 is None:
        return None
    o1 = other(graph, m1, a)
    if o1 is None:
        return None
    m2 = _single(graph, out(graph, m1), "Mul")
    o2 = other(graph, m2, out(graph, m1)) if m2 is not None else None
    if scalar(graph, o1) is None and o2 is not None and scalar(graph, o2) is not None:
        return o1, [m1, m2], out(graph, m2)            # (x * a) * 0.5
    if scalar(graph, o1) is not None and o2 is not None and scalar(graph, o2) is None:
        return o2, [m1, m2], out(graph, m2)            # (a * 0.5) * x
    half = graph.producer(o1)
    if half is not None and half.op_type == "Mul" and not half.domain and len(graph.consumers(o1)) == 1:
        ins = graph.inputs_of(half)
        consts = [scalar(graph, v) is not None for v in ins]
        if sorted(consts) == [False, True]:
            return ins[consts.index(False)], [half, m1], out(graph, m1)   # (x * 0.5) * a
    return None


def _inner(graph: Graph, start: Value, x: Value) -> list[Op] | None:
    """The elementwise ops computing `start` from x and constants (at most a few), or None."""
    ops: list[Op] = []
    stack = [start]
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        if value is x or graph.is_const(value) or id(value) in seen:
            continue
        seen.add(id(value))
        op = graph.producer(value)
        if op is None or op.domain or op.op_type not in _ELEMENTWISE or len(ops) >= _MAX_INNER_OPS:
            return None
        ops.append(op)
        stack.extend(v for v in graph.inputs_of(op) if v is not None)
    return ops


class FormulaGelu(Rule):
    name = "gelu-formula"
    roots = frozenset({"Erf", "Tanh"})

    def match(self, graph: Graph, op: Op) -> Match | None:
        add = _single(graph, out(graph, op), "Add")
        if add is None or not is_scalar(graph, other(graph, add, out(graph, op)), 1.0):
            return None
        found = _product(graph, out(graph, add))
        if found is None:
            return None
        x, tail, y = found
        inner = _inner(graph, graph.inputs_of(op)[0], x)
        if inner is None or not inner:
            return None
        approximate = "none" if op.op_type == "Erf" else "tanh"
        return Match(op, [*inner, op, add, *tail], {"x": x, "y": y}, {"approximate": approximate})

    def check(self, graph: Graph, match: Match) -> str | None:
        if opset(graph) < 20:
            return f"Gelu needs opset 20 (the graph has {opset(graph)})"
        if not inner_values_owned(graph, match.ops, [match["y"]]):
            return "an intermediate value is read outside the GELU"
        got = block_function(graph, match.ops, match["x"], match["y"], PROBE)
        want = gelu_reference(PROBE, match.params["approximate"])
        if got is None or not np.allclose(got, want, rtol=0, atol=5e-5):
            return f"the block does not compute GELU ({match.params['approximate']}) on probe values"
        return None

    def rewrite(self, graph: Graph, match: Match) -> None:
        y = match["y"]
        b = Builder(graph, graph.producer(y))
        detach(graph, graph.producer(y))
        b.op("Gelu", match["x"], out=y, approximate=match.params["approximate"])


class MicrosoftGelu(Rule):
    """com.microsoft Gelu (erf), FastGelu (tanh, optional bias), BiasGelu (erf, bias)."""

    name = "gelu-com-microsoft"
    roots = frozenset({f"{MS}::Gelu", f"{MS}::FastGelu", f"{MS}::BiasGelu"})

    def match(self, graph: Graph, op: Op) -> Match | None:
        ins = graph.inputs_of(op) + [None]
        approximate = "tanh" if op.op_type == "FastGelu" else "none"
        return Match(op, [op], {"x": ins[0], "bias": ins[1], "y": out(graph, op)}, {"approximate": approximate})

    def check(self, graph: Graph, match: Match) -> str | None:
        if opset(graph) < 20:
            return f"Gelu needs opset 20 (the graph has {opset(graph)})"
        return None

    def rewrite(self, graph: Graph, match: Match) -> None:
        b = Builder(graph, match.root)
        detach(graph, match.root)
        x = match["x"] if match["bias"] is None else b.op("Add", match["x"], match["bias"])
        b.op("Gelu", x, out=match["y"], approximate=match.params["approximate"])


RULES = (FormulaGelu(), MicrosoftGelu())
