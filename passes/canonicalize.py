"""Bring every exporter variant of a concept to its one canonical form (the front end's rules,
edgeq.frontend.rules): LayerNorm, RMSNorm, GELU, SiLU/SwiGLU, the attention core (one scale on the
scores, no NaN guard once the mask is finite), com.microsoft fused ops, and the attention-mask
bias (recognised by what it computes, replaced by one canonical subgraph per model).

Stats: rewrites per rule, refusals as '<rule> refused: <reason>', masks as 'mask <kind>' (sites
rewritten) or 'mask unrecognised: <bias> (<why>)', and every op of another domain still in the
graph as 'left as is: <domain>::<op>'.
"""

from __future__ import annotations

from collections import Counter

from edgeq.frontend.rules import RULES, MaskReport, apply_rules, canonicalize_masks
from edgeq.ir import Graph
from edgeq.passes.shape_inference import ShapeInference
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.registry import register_pass


@register_pass
class Canonicalize(Pass):
    name = "canonicalize"
    description = ("rewrite exporter variants (LayerNorm, RMSNorm, GELU, SiLU, attention, the mask bias, "
                   "com.microsoft fused ops) into the canonical forms every target matches")

    def __init__(self, masks: bool = True):
        self.masks = masks  # False: leave the attention-mask subgraph as exported

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        ShapeInference().run(graph, ctx)  # dtypes and ranks the rules read (no-op casts, norm axes)
        report = apply_rules(graph, RULES)
        masks = canonicalize_masks(graph) if self.masks else MaskReport()
        if masks.replaced:
            apply_rules(graph, RULES, report)  # the NaN guards go once the bias is finite
        left = Counter(op.kind for op in graph.ops() if op.domain)
        stats: dict[str, int] = {**report.stats(), **masks.stats()}
        stats.update({f"left as is: {kind}": n for kind, n in sorted(left.items())})
        return PassResult(graph, bool(report.applied or masks.replaced), stats)
