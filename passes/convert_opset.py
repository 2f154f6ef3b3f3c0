"""Convert the graph to the target's opset with onnx's version converter.

Quantized forms need recent opsets (int4/int16 Q/DQ and block-wise DequantizeLinear: 21), and
raising the opset number alone would change ops' meaning (ReduceMean's axes became an input at
18). The converter runs on the graph without its large weights, which are re-attached by name,
so no weight is copied.
"""

from __future__ import annotations

from onnx import version_converter

from edgeq.errors import GraphError
from edgeq.ir import Graph
from edgeq.ir.from_proto import graph_from_proto, model_info_from_proto
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.passes.shape_inference import model_for_analysis
from edgeq.registry import register_pass


@register_pass
class ConvertOpset(Pass):
    name = "convert-opset"
    description = "convert the default-domain opset (up only) with onnx's version converter"

    def __init__(self, version: int = 21):
        self.version = version

    @classmethod
    def from_options(cls, options, target) -> "ConvertOpset":
        return cls(target.opset)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        current = graph.model.opset_imports.get("", graph.model.opset_imports.get("ai.onnx", 1))
        if current >= self.version:
            return PassResult(graph, False, {"from": current, "to": current})
        model = model_for_analysis(graph)
        try:
            converted = version_converter.convert_version(model, self.version)
        except Exception as err:  # the converter's own message names the op it cannot adapt
            raise GraphError(f"cannot convert opset {current} to {self.version}: {err}",
                             fix="re-export the model at a newer opset") from None
        tensors = {v.name: v.const for v in graph.initializers}
        info = model_info_from_proto(converted)
        info.ir_version = max(info.ir_version, graph.model.ir_version, 10)
        graph.take_contents(graph_from_proto(converted.graph, model=info, tensors=tensors))
        return PassResult(graph, True, {"from": current, "to": self.version})
