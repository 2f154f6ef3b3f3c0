"""Rank quantized ops by how much error they cause, and keep the worst ones high on request.

For every quantized op: the SQNR of its output in the quantized model against the float model
(the error accumulated up to that op), and the end-to-end effect of keeping it high (how much
the model output's relative L2 error drops when only that op goes back to float). Variants are
built from the same calibration ranges and cached quantized weights, so no op is calibrated or
quantized twice. `keep_high=K` removes the K ops with the largest gain from the plan;
`accuracy_budget=e` removes ops, largest gain first, until the output error is at most e.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.ir import Graph, clone_graph, save
from edgeq.pipeline import PassContext, Pass, PassManager, PassResult
from edgeq.pipeline.artifacts import CALIBRATION_DATA, QUANT_PLAN, SENSITIVITY
from edgeq.quant.numerics import sqnr_db
from edgeq.quant.plan import QuantPlan
from edgeq.registry import register_pass
from edgeq.runtime.sessions import make_session



@dataclass
class OpSensitivity:
    op: str
    op_type: str
    sqnr_db: float
    gain: float | None = None   # drop of output relative L2 error when this op alone stays high


@register_pass
class Sensitivity(Pass):
    name = "sensitivity"
    description = "rank quantized ops by output SQNR and end-to-end gain; keep the worst high on request"

    def __init__(self, keep_high: int = 0, accuracy_budget: float | None = None, samples: int = 2,
                 max_candidates: int = 48, threads: int = 0, analyse: bool = True):
        self.keep_high = keep_high
        self.accuracy_budget = accuracy_budget
        self.samples = samples
        self.max_candidates = max_candidates
        self.threads = threads
        self.analyse = analyse

    @classmethod
    def from_options(cls, options, target) -> "Sensitivity":
        return cls(options.keep_high, options.accuracy_budget, threads=options.threads,
                   analyse=options.sensitivity or bool(options.keep_high) or options.accuracy_budget is not None)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        plan: QuantPlan = ctx.artifact(QUANT_PLAN, self.name)
        data = ctx.artifacts.get(CALIBRATION_DATA)
        if not self.analyse or not plan.ops or data is None:
            return PassResult(graph, False, {"ranked": 0})
        feeds = [dict(f) for _, f in zip(range(self.samples), data)]
        with tempfile.TemporaryDirectory(prefix="edgeq-sensitivity-") as tmp:
            runner = _VariantRunner(graph, plan, ctx, feeds, Path(tmp), self.threads)
            ranking = runner.rank(self.max_candidates)
            kept = self._choose(runner, ranking)
        for name in kept:
            op_plan = next(p for p in plan.ops if p.op.name == name)
            plan.ops.remove(op_plan)
            plan.kept_high.append((op_plan.op, "sensitivity: kept high"))
        ctx.artifacts[SENSITIVITY] = ranking
        return PassResult(graph, False, {"ranked": len(ranking), "kept_high": len(kept),
                                         "baseline_error": round(runner.baseline_error, 6)})

    def _choose(self, runner: "_VariantRunner", ranking: list[OpSensitivity]) -> list[str]:
        by_gain = [r.op for r in sorted(ranking, key=lambda r: -(r.gain or 0.0)) if r.gain is not None]
        if self.accuracy_budget is None:
            return by_gain[: self.keep_high]
        chosen: list[str] = by_gain[: self.keep_high]
        error = runner.output_error(set(chosen)) if chosen else runner.baseline_error
        for name in by_gain[len(chosen):]:
            if error <= self.accuracy_budget:
                break
            chosen.append(name)
            error = runner.output_error(set(chosen))
        return chosen


class _VariantRunner:
    """Builds quantized variants of one pre-quantization graph and measures them in ORT."""

    def __init__(self, graph: Graph, plan: QuantPlan, ctx: PassContext, feeds: list[dict], tmp: Path,
                 threads: int):
        from edgeq.passes.insert_qdq import InsertQDQ

        self.graph = graph
        self.plan = plan
        self.ctx = ctx
        self.feeds = feeds
        self.tmp = tmp
        self.threads = threads
        self.insert = InsertQDQ(weight_cache={})
        float_path = tmp / "float.onnx"
        save(graph, float_path)
        self.op_outputs = {p.op.name: _output_name(graph, p.op) for p in plan.ops}
        self.outputs = [v.name for v in graph.outputs]
        session = make_session(float_path, threads)
        self.reference = [session.run(None, f) for f in feeds]
        self.reference_ops = self._op_tensors(float_path)
        self.baseline_error = self.output_error(set())

    def _variant(self, high: set[str]) -> Path:
        from edgeq.quant.plan import QuantPlan as Plan

        clone = clone_graph(self.graph)
        by_name = {op.name: op for op in clone.ops()}
        ops = []
        for op_plan in self.plan.ops:
            if op_plan.op.name in high:
                continue
            copy = type(op_plan)(by_name[op_plan.op.name], dict(op_plan.activations), dict(op_plan.weights),
                                 op_plan.bias, op_plan.two_digit)
            ops.append(copy)
        ctx = PassContext(target=self.ctx.target, artifacts=dict(self.ctx.artifacts))
        ctx.artifacts[QUANT_PLAN] = Plan(self.plan.scheme, self.plan.roles, ops, [])
        from edgeq.registry import get_pass

        PassManager([self.insert, get_pass("dead-code-elimination")()])(clone, ctx)
        path = self.tmp / f"variant{len(high)}_{abs(hash(tuple(sorted(high)))) % 10**8}.onnx"
        save(clone, path)
        return path

    def output_error(self, high: set[str]) -> float:
        session = make_session(self._variant(high), self.threads)
        num = den = 0.0
        for feed, reference in zip(self.feeds, self.reference):
            for ref, out in zip(reference, session.run(None, feed)):
                ref64 = np.asarray(ref, np.float64)
                num += float(np.sum((ref64 - out) ** 2))
                den += float(np.sum(ref64**2))
        return float(np.sqrt(num / den)) if den else float(np.sqrt(num))

    def _op_tensors(self, path: Path) -> list[list[np.ndarray]]:
        names = [n for n in self.op_outputs.values() if n]
        return _run_with_outputs(path, names, self.feeds, self.threads)

    def rank(self, max_candidates: int) -> list[OpSensitivity]:
        quantized = self._variant(set())
        names = [n for n in self.op_outputs.values() if n]
        tensors = _run_with_outputs(quantized, names, self.feeds, self.threads)
        ranking = []
        for op_plan in self.plan.ops:
            name = self.op_outputs[op_plan.op.name]
            if not name:
                continue
            k = names.index(name)
            ref = np.concatenate([s[k].ravel() for s in self.reference_ops])
            got = np.concatenate([s[k].ravel() for s in tensors])
            ranking.append(OpSensitivity(op_plan.op.name, op_plan.op.op_type, sqnr_db(ref, got)))
        ranking.sort(key=lambda r: r.sqnr_db)
        # End-to-end gains for the ops with the lowest SQNR (all of them when few): the
        # likeliest culprits, at one variant each.
        with self.ctx.task("end-to-end probes", min(len(ranking), max_candidates), "op") as advance:
            for item in ranking[:max_candidates]:
                item.gain = self.baseline_error - self.output_error({item.op})
                advance()
        return ranking


def _output_name(graph: Graph, op) -> str | None:
    out = graph.outputs_of(op)[0] if graph.outputs_of(op) else None
    return out.name if out is not None else None


def _run_with_outputs(path: Path, names: list[str], feeds: list[dict], threads: int) -> list[list[np.ndarray]]:
    """Run a model file with extra graph outputs (written beside it, weights kept external)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.add().name = name
    probe = path.with_name(path.stem + "_probe.onnx")
    onnx.save(model, str(probe))
    del model
    session = make_session(probe, threads)
    return [session.run(names, feed) for feed in feeds]
