"""SiLU -> `Mul(x, Sigmoid(x))`; SwiGLU -> `Mul(SiLU(gate), up)`: the operand orders of the
canonical forms (exporters write either)."""

from __future__ import annotations

from edgeq.frontend.rules.base import Match, Rule, out
from edgeq.ir import Graph, Op


def is_silu(graph: Graph, op: Op) -> bool:
    """`op` is Mul(x, Sigmoid(x)) in either order."""
    if op.op_type != "Mul" or op.domain:
        return False
    a, b = (graph.inputs_of(op) + [None, None])[:2]
    for x, s in ((a, b), (b, a)):
        sig = graph.producer(s) if s is not None else None
        if sig is not None and sig.op_type == "Sigmoid" and not sig.domain and graph.inputs_of(sig)[0] is x:
            return True
    return False


class SiluOrder(Rule):
    name = "silu-order"
    roots = frozenset({"Sigmoid"})

    def match(self, graph: Graph, op: Op) -> Match | None:
        x, s = graph.inputs_of(op)[0], out(graph, op)
        for mul in graph.consumers(s):
            if mul.op_type == "Mul" and not mul.domain and graph.inputs_of(mul) == [s, x]:
                return Match(op, [], {"x": x, "s": s}, {"mul": mul})
        return None

    def rewrite(self, graph: Graph, match: Match) -> None:
        mul = match.params["mul"]
        graph.set_input(mul, 0, match["x"])
        graph.set_input(mul, 1, match["s"])


class SwigluOrder(Rule):
    name = "swiglu-order"
    roots = frozenset({"Mul"})

    def match(self, graph: Graph, op: Op) -> Match | None:
        ins = graph.inputs_of(op)
        if len(ins) != 2 or ins[0] is None or ins[1] is None or ins[0] is ins[1]:
            return None
        first, second = (graph.producer(v) for v in ins)
        if second is not None and is_silu(graph, second) and not (first is not None and is_silu(graph, first)):
            return Match(op, [], {"up": ins[0], "silu": ins[1]})
        return None

    def rewrite(self, graph: Graph, match: Match) -> None:
        graph.set_input(match.root, 0, match["silu"])
        graph.set_input(match.root, 1, match["up"])


RULES = (SiluOrder(), SwigluOrder())
