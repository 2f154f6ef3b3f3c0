"""Remove Identity ops (and inference-time Dropout) by rewiring their readers."""

from __future__ import annotations

from edgeq.errors import OptionError
from edgeq.ir import Graph, Op
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.registry import register_pass


@register_pass
class IdentityElimination(Pass):
    name = "identity-elimination"
    description = "remove Identity ops and inference-mode Dropout"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        removed = 0
        for op in graph.topo_order():
            if self._removable(graph, op) and self._bypass(graph, op):
                removed += 1
        return PassResult(graph, removed > 0, {"ops_removed": removed})

    @staticmethod
    def _removable(graph: Graph, op: Op) -> bool:
        if op.domain:
            return False
        outputs = [v for v in graph.outputs_of(op) if v is not None]
        if op.op_type == "Identity":
            return len(outputs) == 1
        # Dropout is the identity at inference unless training_mode is set or the mask is read.
        if op.op_type == "Dropout":
            ins = graph.inputs_of(op)
            training = ins[2] if len(ins) > 2 else None
            mode = graph.constant(training) if training is not None else None
            if mode is not None and bool(mode.numpy().reshape(-1)[0]):
                ratio = graph.constant(ins[1]) if len(ins) > 1 and ins[1] is not None else None
                if ratio is None or float(ratio.numpy().reshape(-1)[0]) > 0:
                    raise OptionError(f"Dropout '{op.name}' runs in training mode: the model was exported "
                                      "while training, so its outputs are random",
                                      fix="export it again after model.eval()")
            inference = training is None or (mode is not None and not bool(mode.numpy().reshape(-1)[0]))
            return len(outputs) == 1 and graph.outputs_of(op)[0] is outputs[0] and inference
        return False

    @staticmethod
    def _bypass(graph: Graph, op: Op) -> bool:
        source = graph.inputs_of(op)[0]
        result = graph.outputs_of(op)[0]
        # Subgraphs (If/Loop/Scan bodies) read outer values by name.
        result_captured_by = [r for r in graph.consumers(result) if result in graph.implicit_inputs(r)]
        if graph.is_graph_output(result):
            if graph.is_graph_output(source) or source in graph.inputs or source.const is not None or source.outer:
                return False  # the output name must survive and the source can't take it over
            if result_captured_by or any(source in graph.implicit_inputs(r) for r in graph.consumers(source)):
                return False  # renaming the source would strand the subgraphs reading it by name
            # The source takes over the output's name so the graph's interface is unchanged.
            graph.remove_op(op, remove_outputs=False)
            graph.replace_all_uses(result, source)
            graph.remove_value(result)
            graph.rename_value(source, result.name)
            if result.type is not None:
                source.type = result.type
            return True
        if any(source in graph.implicit_inputs(r) for r in result_captured_by):
            return False  # a subgraph reads both names; it cannot take one value under two names
        graph.replace_all_uses(result, source)
        graph.remove_op(op)
        return True
