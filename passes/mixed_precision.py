"""The mixed 8/16-bit activation plan of a whole-graph target: tensors stay 16-bit by default and
go to 8 bits where the sensitivity analysis allows (an NPU runs 8-bit tensors at twice the rate
and half the bandwidth of 16-bit ones).

Tensors are grouped with the tensors that must share their width: ONNX Runtime groups a
DQ -> op -> Q "node unit" (what a provider such as QNN runs as one integer op) only when the op's
inputs and output have one dtype (a linear op's or a norm's input 0 and output; issue 13: a
MatMul reading 16 bits and writing 8 ran in float on the HTP), and a shared op (data movement)
keeps its input's quantization. On a transformer every such group reaches the residual stream,
so nothing narrows there without a conversion (DQ -> Q, QNN Convert) between units of different
widths, which this plan does not place yet. The residual stream stays 16-bit: a tensor a norm reads or
writes, a residual add's, an embedding's or a graph output (narrowing any one of them alone
multiplies the BERT fixture's output error by 4 to 9; an attention or MLP tensor adds under 10%).
The other groups are ranked by their own 8-bit SQNR, from their calibration histograms (the
signal power against the noise of an 8-bit grid over the range, step^2 / 12), and tried in that
order by group testing: a chunk of groups is narrowed when the output error stays within the
allowance, else its halves are tried, down to single groups, within `max_variants` measurements.
Each measurement runs the QDQ model on ONNX Runtime's CPU provider against float on the first
calibration samples. The allowance: --accuracy-budget (the output's relative L2 error) where
given, else the all-16-bit error times (1 + tolerance).

A narrowed tensor is 8-bit where it is produced and for every reader (no conversions), with the
8-bit fixed output spec where its producer's kernel imposes one. Ops whose kernels the target
does not run with 8-bit inputs (OpRule activations of 16 bits only, `narrow_kinds` not naming
them) keep their tensors at 16 bits.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgeq.ir import Graph, Value, clone_graph, save
from edgeq.pipeline import Pass, PassContext, PassManager, PassResult
from edgeq.pipeline.artifacts import ACTIVATION_RANGES, CALIBRATION_DATA, CALIBRATION_STATISTICS, QUANT_PLAN
from edgeq.quant.plan import OpPlan, QuantPlan
from edgeq.registry import register_pass
from edgeq.runtime.sessions import make_session
from edgeq.targets.base import QSpec


# Ops whose QDQ node unit ties only input 0 to the output (the others: weights, a second matmul
# operand, a norm's gamma keep their own width).
_FIRST_INPUT_TIED = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "LayerNormalization",
                               "RMSNormalization", "InstanceNormalization"})


@dataclass
class _Group:
    """Tensors sharing one quantization: their (op plan, output slot) producers and
    (op plan, input slot) readers."""

    tensors: list[str]
    producers: list[tuple[OpPlan, int]]
    readers: list[tuple[OpPlan, int]]
    sqnr8_db: float = float("-inf")


@register_pass
class MixedPrecision(Pass):
    name = "mixed-precision"
    description = "narrow 16-bit activations of a whole-graph plan to 8 bits where the output error allows"

    def __init__(self, accuracy_budget: float | None = None, tolerance: float = 0.25, samples: int = 2,
                 threads: int = 0, enabled: bool = True, max_variants: int = 24):
        self.accuracy_budget = accuracy_budget
        self.tolerance = tolerance
        self.max_variants = max_variants
        self.samples = samples
        self.threads = threads
        self.enabled = enabled

    @classmethod
    def from_options(cls, options, target) -> "MixedPrecision":
        # --activations int8/int16 fix every activation's width: nothing left to choose.
        return cls(options.accuracy_budget, threads=options.threads, enabled=options.activations is None)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        plan: QuantPlan = ctx.artifact(QUANT_PLAN, self.name)
        data = ctx.artifacts.get(CALIBRATION_DATA)
        stats = ctx.artifacts.get(CALIBRATION_STATISTICS)
        narrow = _narrow_dtypes(ctx)
        if not (self.enabled and plan.whole_graph and narrow and data is not None and stats is not None):
            return PassResult(graph, False, {"narrowed": 0})
        groups = _groups(graph, plan, narrow)
        stream = _residual_stream(graph, plan)
        ranges = ctx.artifacts.get(ACTIVATION_RANGES, {})
        for group in groups:
            group.sqnr8_db = min((_sqnr8(stats, name, ranges) for name in group.tensors), default=float("-inf"))
        ranked = sorted((g for g in groups if np.isfinite(g.sqnr8_db) and not stream & set(g.tensors)),
                        key=lambda g: -g.sqnr8_db)
        if not ranked:  # nothing may narrow: no variant to measure
            return PassResult(graph, False, {"groups": len(groups), "candidates": 0, "narrowed_groups": 0,
                                             "narrowed_tensors": 0, "variants": 0})
        feeds = [dict(f) for _, f in zip(range(self.samples), data)]
        with tempfile.TemporaryDirectory(prefix="edgeq-mixed-") as tmp:
            runner = _Runner(graph, plan, ctx, feeds, Path(tmp), self.threads, narrow)
            baseline = runner.error([])
            allowed = self.accuracy_budget if self.accuracy_budget is not None else baseline * (1 + self.tolerance)
            accepted: list[_Group] = []
            best = [baseline]

            def test(chunk: list[_Group]) -> None:
                if not chunk or runner.count > self.max_variants:
                    return
                error = runner.error(accepted + chunk)
                if error <= allowed:
                    accepted.extend(chunk)
                    best[0] = error
                elif len(chunk) > 1:
                    test(chunk[: len(chunk) // 2])
                    test(chunk[len(chunk) // 2:])

            test(ranked)
        for group in accepted:
            _narrow_group(group, plan, narrow)
        tensors = sum(len(g.tensors) for g in accepted)
        return PassResult(graph, bool(accepted), {
            "groups": len(groups), "candidates": len(ranked), "narrowed_groups": len(accepted),
            "narrowed_tensors": tensors, "variants": runner.count, "error_16bit": round(baseline, 6),
            "error": round(best[0], 6), "allowed": round(allowed, 6)})


def _residual_stream(graph: Graph, plan: QuantPlan) -> set[str]:
    """Tensors of the residual stream: what a norm reads or writes, a residual add's inputs and
    output, an embedding's output, the graph outputs."""
    from edgeq.frontend.patterns import Role

    names = {v.name for v in graph.outputs}
    for op_plan in plan.ops:
        op = op_plan.op
        role = plan.roles.role(op)
        norm = op.op_type in ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
        if norm or role in (Role.RESIDUAL_ADD, Role.LAYER_NORM, Role.RMS_NORM):
            names.update(v.name for v in graph.inputs_of(op)[:1] + graph.outputs_of(op) if v is not None)
            if role == Role.RESIDUAL_ADD:
                names.update(v.name for v in graph.inputs_of(op) if v is not None)
        elif role == Role.EMBEDDING or (op.op_type == "Gather" and op_plan.weights):
            names.update(v.name for v in graph.outputs_of(op) if v is not None)
    return names


def _narrow_dtypes(ctx: PassContext) -> dict[str, str]:
    """16-bit activation dtype -> the 8-bit one the target also takes."""
    target = ctx.target
    pairs = {"uint16": "uint8", "int16": "int8"}
    return {wide: narrow for wide, narrow in pairs.items()
            if target is not None and narrow in target.activation_dtypes}


def _groups(graph: Graph, plan: QuantPlan, narrow: dict[str, str]) -> list[_Group]:
    """Groups of quantized tensors (union over shared ops), excluding any tensor a reader or
    producer cannot take in 8 bits."""
    by_op = {p.op: p for p in plan.ops}
    parent: dict[str, str] = {}

    def find(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    producers: dict[str, list[tuple[OpPlan, int]]] = {}
    readers: dict[str, list[tuple[OpPlan, int]]] = {}
    for op_plan in plan.ops:
        ins = graph.inputs_of(op_plan.op)
        for slot in op_plan.activations:
            readers.setdefault(ins[slot].name, []).append((op_plan, slot))
        for slot in op_plan.outputs:
            producers.setdefault(graph.outputs_of(op_plan.op)[slot].name, []).append((op_plan, slot))
        # One node unit, one width: the slots ONNX Runtime's QDQ selectors require of one dtype
        # (every activation input and the output; a linear op's or norm's input 0 and output).
        first_only = op_plan.op.op_type in _FIRST_INPUT_TIED
        tied = [ins[s].name for s in sorted(op_plan.activations) if ins[s] is not None and (s == 0 or not first_only)]
        tied += [graph.outputs_of(op_plan.op)[s].name for s in sorted(op_plan.outputs)
                 if graph.outputs_of(op_plan.op)[s] is not None]
        for name in tied[1:]:
            parent[find(name)] = find(tied[0])
    members: dict[str, list[str]] = {}
    for name in {*producers, *readers}:
        members.setdefault(find(name), []).append(name)
    groups = []
    for names in members.values():
        group = _Group(sorted(names), [p for n in names for p in producers.get(n, ())],
                       [r for n in names for r in readers.get(n, ())])
        specs = [p.outputs[s] for p, s in group.producers] + [p.activations[s] for p, s in group.readers]
        unplanned_reader = any(reader not in by_op for n in names for reader in graph.consumers(graph.value(n))
                               if reader.op_type not in ("QuantizeLinear", "DequantizeLinear"))
        if specs and all(s.dtype in narrow for s in specs) and not unplanned_reader:
            groups.append(group)
    return groups


def _sqnr8(stats, name: str, ranges: dict[str, tuple[float, float]]) -> float:
    """The tensor's SQNR (dB) on an 8-bit grid over its quantization range (fixed ranges: its
    own min/max), from its calibration histogram."""
    if name not in stats:
        return float("-inf")
    tensor = stats[name]
    lo, hi = ranges.get(name, (min(tensor.min, 0.0), max(tensor.max, 0.0)))
    step = (float(hi) - float(lo)) / 255.0
    if tensor.histogram is None or step <= 0:
        return float("-inf")
    edges = tensor.histogram.edges()
    mids = (edges[:-1] + edges[1:]) / 2
    counts = tensor.histogram.counts.astype(np.float64)
    power = float(np.sum(counts * mids**2) / max(np.sum(counts), 1.0))
    return 10 * np.log10(power / (step**2 / 12)) if power > 0 else float("-inf")


def _narrow_spec(spec: QSpec, narrow: dict[str, str]) -> QSpec:
    return spec.replace(dtype=narrow[spec.dtype], qrange=None, fixed=None)


def _narrow_group(group: _Group, plan: QuantPlan, narrow: dict[str, str]) -> None:
    for op_plan, slot in group.producers:
        spec = op_plan.outputs[slot]
        rule = plan.scheme.rules.get(op_plan.op.kind)
        fixed = rule.output_spec(narrow[spec.dtype]) if rule is not None else None
        op_plan.outputs[slot] = fixed or _narrow_spec(spec, narrow)
    for op_plan, slot in group.readers:
        op_plan.activations[slot] = _narrow_spec(op_plan.activations[slot], narrow)


class _Runner:
    """Measures variants of the plan (some groups narrowed) end to end on the CPU provider."""

    def __init__(self, graph: Graph, plan: QuantPlan, ctx: PassContext, feeds: list[dict], tmp: Path, threads: int,
                 narrow: dict[str, str]):
        from edgeq.passes.insert_qdq import InsertQDQ

        self.graph, self.plan, self.ctx, self.feeds, self.tmp = graph, plan, ctx, feeds, tmp
        self.threads, self.narrow = threads, narrow
        self.insert = InsertQDQ(weight_cache={})
        float_path = tmp / "float.onnx"
        save(graph, float_path)
        session = make_session(float_path, threads)
        self.reference = [session.run(None, f) for f in feeds]
        self.count = 0

    def error(self, groups: list[_Group]) -> float:
        """Relative L2 error of the outputs with `groups` narrowed."""
        from edgeq.registry import get_pass

        clone = clone_graph(self.graph)
        by_name = {op.name: op for op in clone.ops()}
        copies = {id(p): replace(p, op=by_name[p.op.name], activations=dict(p.activations), weights=dict(p.weights),
                                 outputs=dict(p.outputs)) for p in self.plan.ops}
        variant = replace(self.plan, ops=[copies[id(p)] for p in self.plan.ops], kept_high=[])
        for group in groups:
            _narrow_group(_Group(group.tensors, [(copies[id(p)], s) for p, s in group.producers],
                                 [(copies[id(p)], s) for p, s in group.readers]), variant, self.narrow)
        ctx = PassContext(target=self.ctx.target, artifacts=dict(self.ctx.artifacts))
        ctx.artifacts[QUANT_PLAN] = variant
        PassManager([self.insert, get_pass("dead-code-elimination")()])(clone, ctx)
        self.count += 1
        path = self.tmp / f"variant{self.count}.onnx"
        save(clone, path)
        session = make_session(path, self.threads)
        num = den = 0.0
        for feed, reference in zip(self.feeds, self.reference):
            for ref, out in zip(reference, session.run(None, feed)):
                ref64 = np.asarray(ref, np.float64)
                num += float(np.sum((ref64 - out) ** 2))
                den += float(np.sum(ref64**2))
        return float(np.sqrt(num / den)) if den else float(np.sqrt(num))


def narrowed_tensors(graph: Graph, plan: QuantPlan) -> list[str]:
    """Names of the tensors an applied plan quantizes in 8 bits (for reports and tests)."""
    names = []
    for op_plan in plan.ops:
        for slot, spec in op_plan.outputs.items():
            value: Value | None = graph.outputs_of(op_plan.op)[slot]
            if value is not None and spec.bits == 8:
                names.append(value.name)
    return names
