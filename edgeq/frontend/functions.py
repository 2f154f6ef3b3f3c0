"""ONNX local functions inlined (onnx.inliner), so that passes and pattern matching see the ops
inside a function-wrapped block (the dynamo exporter can export modules as functions).

The inliner runs on the graph's structure only (`graph_to_proto(with_data=False)`); the weights
are handed back by name, so nothing is copied. Functions from other opsets are version-converted
by the inliner where they differ from the model's default-domain opset.
"""

from __future__ import annotations

import onnx.inliner

from edgeq.errors import GraphError
from edgeq.ir import Graph
from edgeq.ir.from_proto import graph_from_proto, model_info_from_proto
from edgeq.ir.to_proto import graph_to_proto, model_header


def function_calls(graph: Graph) -> int:
    """Ops of the top-level graph that call a local function of the model."""
    if graph.model is None or not graph.model.functions:
        return 0
    local = {(f.domain, f.name) for f in graph.model.functions}
    return sum((op.domain, op.op_type) in local for op in graph.ops())


def inline_functions(graph: Graph) -> int:
    """Inline every call of a model-local function (recursively), in place; drop the functions.
    Returns the calls inlined."""
    calls = function_calls(graph)
    if graph.model is None or not graph.model.functions:
        return 0
    model = model_header(graph)
    model.graph.CopyFrom(graph_to_proto(graph, with_data=False))
    try:
        inlined = onnx.inliner.inline_local_functions(model, convert_version=True)
    except Exception as err:  # the inliner's message names the function it cannot inline
        raise GraphError(f"cannot inline the model's local functions: {str(err).splitlines()[0]}",
                         fix="re-export the model without functions") from None
    info = model_info_from_proto(inlined)
    info.opset_order = [o.domain for o in inlined.opset_import]
    info.ir_version = max(info.ir_version, graph.model.ir_version)
    info.functions = []
    tensors = {v.name: v.const for v in graph.initializers}
    rebuilt = graph_from_proto(inlined.graph, model=info, tensors=tensors)
    graph.take_contents(rebuilt)
    return calls
