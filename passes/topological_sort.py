"""Make the graph's saved node order its current topological order."""

from __future__ import annotations

from edgeq.ir import Graph
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.registry import register_pass


@register_pass
class TopologicalSort(Pass):
    name = "topological-sort"
    description = "renumber ops in a stable topological order (original order where possible)"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        before = [op.order for op in graph.topo_order()]
        graph.renumber()
        after = [op.order for op in graph.topo_order()]
        return PassResult(graph, before != after, {"ops": len(after)})
