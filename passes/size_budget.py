"""Mixed weight precision under a size budget (--size-budget): each linear's weights go to int4,
int8 or stay float, and each embedding table to int8 or float, so that the compiled model's
bytes meet the budget at the least estimated error.

The error of a width is the model's output error power ||y_q - y||^2 / ||y||^2 on the first
calibration sample (its first 64 tokens) with that weight alone quantized (round to nearest)
and every other weight float, measured for the unit's narrowest width by feeding the dequantized weight to the float
model (no rebuild: ORT is fed the weights); the wider quantized widths take that power scaled
by the layer's own ratio of Hessian-weighted output errors, tr(E^T H E) / tr(W^T H W) (noise
this small reaches the output linearly); float is 0. The model's error is taken as the sum over
units (independent noise adds in power). Why measured: the per-layer proxies alone rank the
layers poorly, since a layer's gain to the output differs by layer (the synthetic and exported
tiny Llamas: Spearman 0.18 and 0.03 of the Hessian-weighted relative error against the measured
one, 0.37 / -0.20 for the absolute error); the summed measured powers predicted the compiled
model's output error within a factor 0.7..1.5 wherever int4 weights remain (tests/passes/
test_size_budget.py). Cost: one forward pass of 64 tokens per unit (SmolLM2: 212 units).
Round to nearest, not GPTQ: GPTQ runs after the widths are chosen and rounds each layer at its
chosen width, lowering every int4 layer's error.

The widths are chosen by `edgeq.quant.budget.choose` (an exact knapsack on a fine grid); the
budget covers the whole file: the constants not chosen here (norm weights, biases, rotation
matrices) and an upper estimate of the graph's protos (`edgeq.quant.budget.proto_bytes`) are
taken off first. The pass runs right after select-precision (the compile adds it when --size-budget is
given); later passes see only the plan's per-op weight specs.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from edgeq.targets.base import Granularity, QSpec, Target

from edgeq.calibration.float_model import FloatModel, load_model
from edgeq.calibration.layer_inputs import hessian_chunks
from edgeq.errors import CalibrationError
from edgeq.ir import Graph, save
from edgeq.options import CompileOptions
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.pipeline.artifacts import CALIBRATION_DATA, QUANT_PLAN
from edgeq.quant.budget import (
    FLOAT_FILE_BYTES,
    SIZE_BUDGET,
    BudgetChoice,
    Unit,
    Width,
    budget_bytes,
    choose,
    infeasible,
    offered_dtypes,
    proto_bytes,
    stored_bytes,
)
from edgeq.quant.linears import linear_groups
from edgeq.quant.plan import OpPlan, QuantPlan
from edgeq.quant.rounding import dequantize_kn, output_errors, quantize_kn
from edgeq.registry import register_pass

_LINEARS = ("MatMul", "Gemm")


@register_pass
class SizeBudget(Pass):
    name = "size-budget"
    description = "choose int4/int8/float weights per layer to meet --size-budget at the least error"

    def __init__(self, budget: float | None = None, *, given: str = "", group: int | None = None,
                 samples: int = 1, tokens: int = 64, threads: int = 0, hessian_budget_mb: int = 256):
        """budget: a ratio of the float model (<= 1) or megabytes; samples: calibration samples
        the layers' Hessians are measured on; tokens: the output errors are measured on the first
        `tokens` positions of those samples (`_leading_tokens`), one forward pass per layer each."""
        self.budget = budget
        self.given = given or (f"{budget}" if budget is not None else "")
        self.group = group
        self.errors = WidthErrors(samples, tokens, threads, hessian_budget_mb)

    @classmethod
    def from_options(cls, options: CompileOptions, target: Target) -> SizeBudget:
        budget = options.size_budget
        given = "" if budget is None else (f"{100 * budget:g}%" if budget <= 1 else f"{budget:g} MB")
        return cls(budget, given=given, group=options.group, threads=options.threads)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if self.budget is None:
            return PassResult(graph, False, {"chosen": 0})
        plan: QuantPlan = ctx.artifact(QUANT_PLAN, self.name)
        units = budget_units(graph, plan, ctx.target, self.group)
        chosen_weights = {u.weight for u in units}
        fixed = _fixed_bytes(graph, chosen_weights)
        float_constants = fixed + sum(u.widths[-1].nbytes for u in units)
        float_file = ctx.artifacts.get(FLOAT_FILE_BYTES) or float_constants
        protos = proto_bytes(len(graph.ops()), len(units))
        budget = budget_bytes(self.budget, float_file)
        base = fixed + protos
        reachable = (base + sum(u.widths[0].nbytes for u in units), base + sum(u.widths[-1].nbytes for u in units))
        narrowest = min((u.widths[0].dtype for u in units if u.kind == "linear"), default="float")
        if not units or not reachable[0] <= budget < min(reachable[1], float_file):
            raise infeasible(budget, reachable, float_file, self.given, narrowest)
        samples = self.errors.measure(graph, plan, units, ctx, "--size-budget")
        picks, error = choose(units, budget - reachable[0])
        choice = BudgetChoice(budget, base, sum(u.widths[j].nbytes for u, j in zip(units, picks)), reachable, error)
        by_name = {p.op.name: p for p in plan.ops}
        for unit, j in zip(units, picks):
            width = unit.widths[j]
            choice.widths[unit.ops[0]] = width.dtype  # by op: exported weight names can be opaque (onnx::MatMul_7)
            for name in unit.ops:
                apply_width(plan, by_name[name], width)
        ctx.artifacts[SIZE_BUDGET] = choice
        stats = {"budget_mb": round(budget / 1e6, 3), "estimated_mb": round(choice.total_bytes / 1e6, 3),
                 "reachable_mb": f"{reachable[0] / 1e6:.1f}..{reachable[1] / 1e6:.1f}",
                 "error_estimate": round(error, 6), "samples": samples,
                 "quantized_bytes": sum(u.widths[j].nbytes for u, j in zip(units, picks) if u.widths[j].spec)}
        stats.update({f"{dtype}_weights": n for dtype, n in sorted(choice.counts().items())})
        return PassResult(graph, True, stats)


@dataclass(frozen=True)
class WidthErrors:
    """How a budget measures each unit's widths' errors (`measure_unit_errors`): on the first
    `samples` calibration samples, output errors on their first `tokens` positions, the layers'
    Hessians in chunks of at most `hessian_budget_mb`."""

    samples: int = 1
    tokens: int = 64
    threads: int = 0
    hessian_budget_mb: int = 256

    def measure(self, graph: Graph, plan: QuantPlan, units: list[Unit], ctx: PassContext, flag: str) -> int:
        """Fill every unit's width errors; the number of samples measured on."""
        data = ctx.artifacts.get(CALIBRATION_DATA)
        if data is None:
            raise CalibrationError(f"{flag} ranks the layers by their output error on calibration data, "
                                   "and none was given", fix="pass --calib or --calib-text")
        feeds = [dict(f) for _, f in zip(range(self.samples), data)]
        measure_unit_errors(graph, plan, units, feeds, _leading_tokens(feeds, self.tokens), self.threads,
                            self.hessian_budget_mb * 2**20, ctx)
        return len(feeds)


def apply_width(plan: QuantPlan, op_plan: OpPlan, width: Width) -> None:
    if width.spec is None:  # float: the op leaves the plan
        plan.ops.remove(op_plan)
        plan.kept_high.append((op_plan.op, "size budget: float weights"))
        return
    for slot in op_plan.weights:
        op_plan.weights[slot] = width.spec


def _linear_specs(target: Target, plan: QuantPlan, group: int | None) -> dict[str, QSpec]:
    """The linear weight specs offered: the preset's width and the wider ones the target takes
    (int4 with --group's or the target's block size, int8 as the target's int8 preset)."""
    preset = plan.scheme.weight_dtype
    specs = {}
    for dtype in offered_dtypes(target, preset):
        spec = target.weight_spec(dtype)
        if group and dtype == preset:
            spec = spec.blocked(group)
        specs[dtype] = spec
    return specs


def budget_units(graph: Graph, plan: QuantPlan, target: Target, group: int | None) -> list[Unit]:
    """One unit per weight tensor of a planned linear (MatMul/Gemm weight in slot 1) or embedding
    table (Gather slot 0), in graph order, with its widths narrowest first."""
    specs = _linear_specs(target, plan, group)
    units: dict[str, Unit] = {}
    kinds: dict[str, set[str]] = {}
    for op_plan in plan.ops:
        op = op_plan.op
        linear = op.op_type in _LINEARS and not op.domain and set(op_plan.weights) == {1}
        embedding = op.op_type == "Gather" and set(op_plan.weights) == {0} and not op_plan.activations
        if not (linear and specs or embedding):
            continue
        value = graph.inputs_of(op)[1 if linear else 0]
        tensor = graph.constant(value)
        kinds.setdefault(value.name, set()).add("linear" if linear else "embedding")
        if value.name in units:  # read by several ops: stored once, one width for all
            units[value.name].ops.append(op.name)
            continue
        dims = tuple(int(d) for d in tensor.dims)
        itemsize = tensor.nbytes // max(1, int(np.prod(dims)))
        if linear:
            channel_axis = 0 if op.op_type == "Gemm" and op.attr("transB", 0) else 1
            offered = {d: s for d, s in specs.items() if _fits(dims, s, channel_axis)}
            widths = [Width(d, s, stored_bytes(dims, s, channel_axis)) for d, s in offered.items()]
        else:
            spec = op_plan.weights[0]
            widths = [Width(spec.dtype, spec, stored_bytes(dims, spec, -1, embedding=True))]
        widths.append(Width("float", None, stored_bytes(dims, None, 0, float_itemsize=itemsize)))
        transposed = linear and op.op_type == "Gemm" and bool(op.attr("transB", 0))
        units[value.name] = Unit(value.name, [op.name], widths, "linear" if linear else "embedding", transposed)
    # A table read both as an embedding and as a linear weight (a tied LM head read directly)
    # keeps the plan's widths: insert-qdq stores it once per reader kind.
    return [u for name, u in units.items() if len(kinds[name]) == 1 and len(u.widths) > 1]


def _fits(dims: tuple[int, ...], spec: QSpec, channel_axis: int) -> bool:
    if spec.granularity != Granularity.BLOCK:
        return True
    return len(dims) == 2 and dims[1 - channel_axis] >= int(spec.block_size)


def _fixed_bytes(graph: Graph, chosen: set[str]) -> int:
    """Bytes of the constants read by some op that no unit chooses (they stay as they are)."""
    total = 0
    for value in graph.values():
        if value.const is not None and value.name not in chosen and graph.consumers(value):
            total += value.const.nbytes
    return total


def _leading_tokens(feeds: list[dict], tokens: int) -> list[dict]:
    """The feeds cut to their first `tokens` positions where every input is a [batch, positions]
    integer array of one length (token ids, masks, positions: a language model's window), else
    the feeds as they are. Why: the measurement runs the model once per layer, and a window's
    first tokens show each layer's relative output error as its whole does (SmolLM2, 212 layers:
    256 tokens would cost 212 forward passes of 256 tokens per sample)."""
    arrays = [np.asarray(a) for f in feeds for a in f.values()]
    lengths = {a.shape[-1] if a.ndim == 2 and a.dtype.kind in "iu" else None for a in arrays}
    if len(lengths) != 1 or None in lengths or next(iter(lengths)) <= tokens:
        return feeds
    return [{k: np.ascontiguousarray(np.asarray(v)[:, :tokens]) for k, v in f.items()} for f in feeds]


def measure_unit_errors(graph: Graph, plan: QuantPlan, units: list[Unit], feeds: list[dict], short: list[dict],
                    threads: int, hessian_budget: int, ctx: PassContext) -> None:
    """Fill each width's error: the model's output error power with that unit alone at its
    narrowest width (measured), and for the wider quantized widths that power scaled by the
    layer's own Hessian-weighted error ratio (a linear's noise reaches the output linearly)."""
    with tempfile.TemporaryDirectory(prefix="edgeq-size-budget-") as tmp:
        path = Path(tmp) / "model.onnx"
        save(graph, path, external_data=True)
        model = FloatModel(*load_model(path), threads)
        relative = _layer_errors(graph, plan, units, model, feeds, hessian_budget, ctx)
        outputs = [v.name for v in graph.outputs]
        run = model.runner(outputs)
        reference = [run(feed) for feed in short]
        with ctx.task("layer sensitivities", len(units), "layer") as advance:
            for unit in units:
                narrow = unit.widths[0]
                if unit.weight in model.weights:
                    original = model.weights[unit.weight]
                    model.weights[unit.weight] = _quantized(unit, original, narrow.spec)
                    power = _error_power(reference, [run(feed) for feed in short])
                    model.weights[unit.weight] = original
                else:  # an inline constant the float model does not feed: its own relative error
                    power = relative[unit.weight][0]
                ratios = relative[unit.weight]
                errors = [power * r / ratios[0] if ratios[0] > 0 else 0.0 for r in ratios] + [0.0]
                unit.widths = [_with_error(width, e) for width, e in zip(unit.widths, errors)]
                advance()


def _quantized(unit: Unit, weight: np.ndarray, spec: QSpec) -> np.ndarray:
    """The weight as stored at `spec`, dequantized, in the weight's own layout."""
    table = weight.astype(np.float32)
    if unit.kind == "embedding":
        from edgeq.quant.numerics import quantize_weight

        q, scale, _ = quantize_weight(table, spec.replace(symmetric=True), channel_axis=-1)
        return (q.astype(np.float32) * np.asarray(scale, np.float32)).astype(weight.dtype)
    w = table.T if unit.transposed else table
    approx = dequantize_kn(*quantize_kn(w, spec), spec)
    return np.ascontiguousarray(approx.T if unit.transposed else approx).astype(weight.dtype)


def _error_power(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]]) -> float:
    """||y_q - y||^2 / ||y||^2 over every float output and sample."""
    num = den = 0.0
    for ref, out in zip(reference, outputs):
        for r, o in zip(ref, out):
            if np.issubdtype(np.asarray(r).dtype, np.floating):
                r64 = np.asarray(r, np.float64)
                num += float(np.sum((np.asarray(o, np.float64) - r64) ** 2))
                den += float(np.sum(r64 ** 2))
    return num / den if den else num


def _layer_errors(graph: Graph, plan: QuantPlan, units: list[Unit], model: FloatModel, feeds: list[dict],
                  hessian_budget: int, ctx: PassContext) -> dict[str, list[float]]:
    """Unit weight -> each quantized width's own relative error: a linear's
    tr(E^T H E) / tr(W^T H W) on its input's Hessian from `feeds`, an embedding table's (or an
    ungrouped linear's) ||E||^2 / ||W||^2."""
    by_op = {name: unit for unit in units for name in unit.ops}
    groups, _ = linear_groups(graph, plan)
    wanted = [g for g in groups if any(lin.op.name in by_op for lin in g.linears)]
    out: dict[str, list[float]] = {}
    with ctx.task("layer input statistics", len(wanted), "group") as advance:
        for chunk in hessian_chunks(wanted, graph, hessian_budget):
            sources = [g.source for g in chunk]
            run = model.runner(sources)
            grams: dict[str, np.ndarray] = {}
            tokens = 0
            for feed in feeds:
                for name, x in zip(sources, run(feed)):
                    x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
                    grams[name] = grams.get(name, 0.0) + (x.T @ x).astype(np.float64)
                tokens += x.shape[0]
            for group in chunk:
                hessian = grams.pop(group.source) * (2.0 / max(tokens, 1))
                for lin in group.linears:
                    unit = by_op.get(lin.op.name)
                    if unit is None or unit.weight in out:
                        continue
                    w = lin.weight_kn(graph)
                    approx = [dequantize_kn(*quantize_kn(w, width.spec), width.spec) for width in unit.widths[:-1]]
                    out[unit.weight] = [float(e) for e in output_errors(hessian, w, *approx)]
                advance()
    for unit in units:
        if unit.weight not in out:
            table = graph.constant(graph.value(unit.weight)).numpy().astype(np.float32)
            if unit.kind == "linear":  # outside every group (a shared weight): the weight's own error
                table = table.T if unit.transposed else table
            out[unit.weight] = [_table_error(table, width.spec, embedding=unit.kind == "embedding")
                                for width in unit.widths[:-1]]
    return out


def _with_error(width: Width, error: float) -> Width:
    return Width(width.dtype, width.spec, width.nbytes, float(error))


def _table_error(table: np.ndarray, spec: QSpec, *, embedding: bool) -> float:
    """||W_q - W||^2 / ||W||^2: an embedding table [rows, hidden] quantized symmetric per hidden
    channel (as insert-qdq stores it), a linear's [K, N] weight as its spec says."""
    if embedding:
        from edgeq.quant.numerics import quantize_weight

        q, scale, _ = quantize_weight(table, spec.replace(symmetric=True), channel_axis=-1)
        approx = q.astype(np.float32) * np.asarray(scale, np.float32)
    else:
        approx = dequantize_kn(*quantize_kn(table, spec), spec)
    den = float(np.sum(table.astype(np.float64) ** 2))
    return float(np.sum((approx - table) ** 2, dtype=np.float64) / den) if den else 0.0
