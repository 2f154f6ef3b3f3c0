"""Casts that change nothing: `Cast(x, to=T)` where x already has type T (the TorchScript
exporter writes them around every RMSNorm of a float32 model) go, so the concept's ops are
adjacent."""

from __future__ import annotations

from edgeq.frontend.rules.base import Match, Rule, out
from edgeq.ir import Graph, Op


class NoOpCast(Rule):
    name = "cast-no-op"
    roots = frozenset({"Cast"})

    def match(self, graph: Graph, op: Op) -> Match | None:
        x = graph.inputs_of(op)[0]
        y = out(graph, op)
        if x is None or x.elem_type is None or op.attr("to") != x.elem_type or graph.is_graph_output(y):
            return None
        return Match(op, [op], {"x": x, "y": y})

    def rewrite(self, graph: Graph, match: Match) -> None:
        graph.replace_all_uses(match["y"], match["x"])


RULES = (NoOpCast(),)
