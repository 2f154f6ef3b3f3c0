"""Mixed weight precision under a latency budget (--latency-budget MS): each linear's weights go to
the preset's narrow width or a wider one (int4 or int8) so that the model's latency, as the
target's device cost model estimates it, meets the budget at the least estimated error.

The latencies come from the compile (`LINEAR_LATENCIES`): it compiles the model once at the
preset's widths and asks the target's cost model what each linear takes at each width on the
device and what the rest of the model takes (on the fpga target: the overlay array the estimate
sizes for the device, where an 8-bit weight takes two passes of its 4-bit lanes and streams twice
the bytes; attention products and nonlinear units do not depend on the weights' width). The
errors are the size budget's (`passes/size_budget.py`: the model's output error with one layer
at its narrow width, measured; the wider width's scaled by the layer's own Hessian-weighted error
ratio), the choice the same exact knapsack (`edgeq.quant.budget.choose`) with nanoseconds as the
cost. A linear the cost model does not price (not a matrix-vector layer of the device's
datapath) keeps the preset's width. The pass runs right after select-precision.
"""

from __future__ import annotations

from edgeq.passes.size_budget import WidthErrors, apply_width, budget_units
from edgeq.targets.base import LinearLatencies, Target

from edgeq.errors import OptionError
from edgeq.ir import Graph
from edgeq.options import CompileOptions
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.pipeline.artifacts import QUANT_PLAN
from edgeq.quant.budget import (
    LATENCY_BUDGET,
    LINEAR_LATENCIES,
    LatencyChoice,
    Unit,
    choose,
)
from edgeq.quant.plan import QuantPlan
from edgeq.registry import register_pass


@register_pass
class LatencyBudget(Pass):
    name = "latency-budget"
    description = "choose each linear's weight width to meet --latency-budget on the device at the least error"

    def __init__(self, budget_ms: float | None = None, *, group: int | None = None, samples: int = 1,
                 tokens: int = 64, threads: int = 0, hessian_budget_mb: int = 256):
        self.budget_ms = budget_ms
        self.group = group
        self.errors = WidthErrors(samples, tokens, threads, hessian_budget_mb)

    @classmethod
    def from_options(cls, options: CompileOptions, target: Target) -> LatencyBudget:
        return cls(options.latency_budget, group=options.group, threads=options.threads)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if self.budget_ms is None:
            return PassResult(graph, False, {"chosen": 0})
        plan: QuantPlan = ctx.artifact(QUANT_PLAN, self.name)
        latencies: LinearLatencies = ctx.artifact(LINEAR_LATENCIES, self.name)
        units, costs = _priced_units(graph, plan, ctx.target, self.group, latencies)
        if not units:
            raise OptionError("--latency-budget has no linear to choose a width for: the preset offers one weight "
                              "width", fix="add --weights int4 (linears then take int4 or int8)")
        budget = self.budget_ms / 1e3
        fixed = latencies.other_seconds + _unpriced_seconds(latencies, units)
        low = fixed + sum(c[0] for c in costs) / 1e9
        high = fixed + sum(c[-1] for c in costs) / 1e9
        if budget < low:
            raise OptionError(f"--latency-budget {self.budget_ms:g} ms is below the fastest model the weight widths "
                              f"reach on {latencies.device}: {1e3 * low:.3f} ms (every linear at "
                              f"{units[0].widths[0].dtype}; {1e3 * high:.3f} ms at {units[0].widths[-2].dtype})",
                              fix="give a larger budget or a larger device")
        self.errors.measure(graph, plan, units, ctx, "--latency-budget")
        for unit in units:  # measured with the float width last (as the size budget's); a device datapath has none
            unit.widths = [w for w in unit.widths if w.spec is not None]
        capacity = int((budget - low) * 1e9)
        picks, error = choose(units, capacity, costs)
        estimated = fixed + sum(c[j] for c, j in zip(costs, picks)) / 1e9
        choice = LatencyChoice(budget, estimated, (low, high), latencies.device, latencies.how, error)
        by_name = {p.op.name: p for p in plan.ops}
        for unit, j in zip(units, picks):
            width = unit.widths[j]
            choice.widths[unit.ops[0]] = width.dtype
            for name in unit.ops:
                apply_width(plan, by_name[name], width)
        ctx.artifacts[LATENCY_BUDGET] = choice
        stats = {"budget_ms": self.budget_ms, "estimated_ms": round(1e3 * estimated, 4),
                 "reachable_ms": f"{1e3 * low:.3f}..{1e3 * high:.3f}", "error_estimate": round(error, 6)}
        stats.update({f"{dtype}_weights": n for dtype, n in sorted(choice.counts().items())})
        return PassResult(graph, True, stats)


def _priced_units(graph: Graph, plan: QuantPlan, target: Target, group: int | None,
                  latencies: LinearLatencies) -> tuple[list[Unit], list[list[int]]]:
    """The linear units with more than one quantized width whose every op the cost model priced at
    each of them, with their costs in nanoseconds (summed over the unit's ops)."""
    units, costs = [], []
    for unit in budget_units(graph, plan, target, group):
        if unit.kind != "linear":
            continue
        quantized = [w for w in unit.widths if w.spec is not None]
        if len(quantized) < 2 or not all(op in latencies.seconds for op in unit.ops):
            continue
        priced = latencies.seconds
        if not all(w.dtype in priced[op] for op in unit.ops for w in quantized):
            continue
        units.append(unit)
        costs.append([round(1e9 * sum(priced[op][w.dtype] for op in unit.ops)) for w in quantized])
    return units, costs


def _unpriced_seconds(latencies: LinearLatencies, units: list[Unit]) -> float:
    """The priced linears no unit chooses (one width only, or not in the plan), at the width the
    priced model has them."""
    chosen = {op for unit in units for op in unit.ops}
    return sum(s for name, s in latencies.as_compiled.items() if name not in chosen)
