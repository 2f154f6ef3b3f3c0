"""Remove ops whose outputs nothing reads, and unused initializers."""

from __future__ import annotations

from edgeq.ir import Graph
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.registry import register_pass


@register_pass
class DeadCodeElimination(Pass):
    name = "dead-code-elimination"
    description = "remove ops with no used output and initializers nothing reads"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        removed_ops = 0
        for op in reversed(graph.topo_order()):
            outputs = [v for v in graph.outputs_of(op) if v is not None]
            if any(graph.consumers(v) or graph.is_graph_output(v) for v in outputs):
                continue
            graph.remove_op(op)
            removed_ops += 1
        graph_inputs = {id(v) for v in graph.inputs}
        unused = [v for v in graph.initializers
                  if id(v) not in graph_inputs and not graph.consumers(v) and not graph.is_graph_output(v)]
        for value in unused:
            graph.remove_value(value)
        return PassResult(graph, bool(removed_ops or unused),
                          {"ops_removed": removed_ops, "initializers_removed": len(unused)})
