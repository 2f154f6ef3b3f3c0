"""Put the constant first in an Add that follows a ConvTranspose: `Add(bias, ConvTranspose(x))`.

QNN's HTP (qnn-htp, simulator v73, QNN SDK 2.51) fuses `Add(ConvTranspose(x), bias)` into a
ConvTranspose with a bias and computes that wrongly: PP-OCRv4 det's DB head (a ConvTranspose
24 -> 24 channels and its bias Add) is off by up to 386 of 65,535 LSB against the CPU run of
the same QDQ model, and the det output's cosine with float drops from 0.9997 to 0.9923; a
ConvTranspose given its bias as an input is wrong too (cosine 0.19). With the constant as the
Add's first input the provider leaves the two ops apart and both are exact (2 LSB). The sum is
the same in any order, so this changes nothing anywhere else.
"""

from __future__ import annotations

from edgeq.ir import Graph
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.registry import register_pass


@register_pass
class ConstantFirstAfterConvTranspose(Pass):
    name = "constant-first-after-conv-transpose"
    description = "write an Add of a constant to a ConvTranspose output as Add(constant, output)"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        swapped = 0
        for op in graph.ops_of_type("Add"):
            ins = graph.inputs_of(op)
            if op.domain or len(ins) != 2 or any(v is None for v in ins):
                continue
            produced, constant = ins
            producer = graph.producer(produced)
            if producer is not None and producer.op_type == "ConvTranspose" and graph.is_const(constant):
                graph.set_input(op, 0, constant)
                graph.set_input(op, 1, produced)
                swapped += 1
        return PassResult(graph, swapped > 0, {"adds_reordered": swapped})
