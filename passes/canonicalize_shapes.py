"""Rewrite the shape arithmetic that depends on dynamic axes into canonical forms: constant
Reshape shapes with 0 and -1, constant Expand shapes with 1 where the input's dim is kept, and
movement chains that are one transpose as that Transpose (canonical.md item 7).

Runs after constant-folding (which folded every shape computation that does not depend on a
dynamic axis). Each rewrite is decided from what the graph computes, not from node or value
names: the graph runs in ONNX Runtime at three probe sizes of its dynamic input axes
(`edgeq.frontend.probing`) and a rewrite is taken only if it reproduces every probe
(`edgeq.frontend.shape_rewrites`). The Shape/Gather/Concat ops that fed only the rewritten
shapes are then dead (dead-code-elimination removes them). What cannot be expressed is left
and counted in the stats under `left_<reason>`.
"""

from __future__ import annotations

from edgeq.frontend import shape_rewrites
from edgeq.ir import Graph
from edgeq.passes.shape_inference import ShapeInference
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.registry import register_pass


@register_pass
class CanonicalizeShapes(Pass):
    name = "canonicalize-shapes"
    description = ("computed Reshape/Expand shapes to constants with 0/-1/1, movement chains that are one "
                   "transpose to a Transpose, decided by probing dynamic axes")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        ShapeInference().run(graph, ctx)  # element types of the values probing reads back
        decided = shape_rewrites.plan(graph)
        counts = shape_rewrites.apply(graph, decided)
        stats = {"reshapes_to_constant": counts["reshapes"], "expands_to_constant": counts["expands"],
                 "chains_to_transpose": counts["chains_to_transpose"],
                 "static_shape_values_to_constant": counts["static_shape_values"],
                 "no_op_reshapes_removed": counts["identities"], "probes": decided.probes}
        stats.update({f"left_{reason}": n for reason, n in sorted(decided.reasons().items())})
        return PassResult(graph, bool(decided.rewrites or decided.folds), stats)
