"""Rewrite rules that bring each exporter variant of a concept to its one canonical form
(canonical.md, issue 11): one module per concept, each with its `RULES` in the order they run.

`base` is the protocol (Rule: name, pattern `match`, `check` returning why it refuses, `rewrite`;
`apply_rules` to a fixed point), `probe` the numeric checks, `mask` the attention-mask bias (a
whole-graph analysis rather than a local rule). The `canonicalize` pass runs them all.
"""

from edgeq.frontend.rules import (attention, casts, embedding, fused_attention, gelu, group_query_attention,
                                  layer_norm, rms_norm, silu)
from edgeq.frontend.rules.base import Match, Rule, RuleReport, apply_rules
from edgeq.frontend.rules.mask import MaskReport, canonicalize_masks

# Casts first (they sit inside exporters' norms), fused ops before the formulas they expand to.
RULES: tuple[Rule, ...] = (*casts.RULES, *embedding.RULES, *group_query_attention.RULES, *fused_attention.RULES,
                           *layer_norm.RULES, *rms_norm.RULES, *gelu.RULES, *silu.RULES, *attention.RULES)

__all__ = ["RULES", "Match", "MaskReport", "Rule", "RuleReport", "apply_rules", "canonicalize_masks"]
