"""`edgeq.compile`: the one entry point from a float model to a verified quantized model."""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import onnx

from edgeq.errors import OptionError
from edgeq.frontend.functions import inline_functions
from edgeq.frontend.shapes import (first_sample_shapes, fix_input_shapes, inputs_model, record_input_shapes,
                                   resolve_input_shapes)
from edgeq.ir import Graph, clone_graph, load, save
from edgeq.options import CompileOptions
from edgeq.quant.plan import Scheme
from edgeq.pipeline import Instrument, Pass, PassContext, PassManager, ReleasePagesInstrument, TimingInstrument
from edgeq.pipeline.artifacts import CALIBRATION_DATA, QUANT_PLAN, SENSITIVITY
from edgeq.registry import get_pass, get_target
from edgeq.report import Report, count_kinds, kept_high_by_reason, pass_rows
from edgeq.runtime.feeds import synthetic_feeds
from edgeq.metadata import PROVIDER_KEY, TARGET_KEY
from edgeq.runtime.placement import check_placement
from edgeq.runtime.providers import resolve as resolve_execution
from edgeq.runtime.verification import compare_with_float
from edgeq.targets.base import Target, validate


@dataclass
class Compiled:
    graph: Graph
    report: Report
    target: Target

    def save(self, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
        return save(self.graph, path, external_data=external_data)


def build_pipeline(target: Target, options: CompileOptions) -> PassManager:
    """The target's default pipeline, each pass built from the typed options."""
    passes: list[Pass] = []
    for name in target.default_pipeline:
        cls = get_pass(name)
        factory = getattr(cls, "from_options", None)
        passes.append(factory(options, target) if factory else cls())
    return PassManager(passes, name=f"{target.name}-pipeline")


def compile(model: str | os.PathLike | onnx.ModelProto | Graph, target: str | Target,
            options: CompileOptions | None = None, *, calibration: Any = None,
            instruments: Sequence[Instrument] = (), provider: str | None = None) -> Compiled:
    """Quantize `model` for `target`. `calibration`: a path (.npz dir/file), a text-window spec,
    an iterable of feed dicts, or an ORT CalibrationDataReader. `instruments` observe the
    pipeline (edgeq.pipeline.instruments); the compile adds its own timing and page release.
    `provider` names one of the target's executions (default: the first that runs here); the
    output follows its QDQ layout, and calibration, verification and the placement check run on it.
    The input is never modified."""
    from edgeq.calibration.sources import open_source, split

    options = options or CompileOptions()
    target = get_target(target) if isinstance(target, str) else target
    target = target.on(resolve_execution(target, provider))
    Scheme.resolve(target, options)  # options the target cannot take fail before any work
    graph = clone_graph(model) if isinstance(model, Graph) else load(model)
    inline_functions(graph)  # the front end sees inside function-wrapped blocks
    with tempfile.TemporaryDirectory(prefix="edgeq-compile-") as tmp:
        float_path = _float_model_path(model, graph, Path(tmp))
        source = open_source(calibration, str(float_path)) if calibration is not None else None
        shapes = resolve_input_shapes(graph, dict(options.input_shapes), static=target.static_shapes,
                                      sample=first_sample_shapes(source), target_name=target.name)
        if shapes.fixed:
            fix_input_shapes(graph, shapes.fixed)
            if source is not None and _reopenable(calibration):  # every sample must have the fixed shapes
                source = open_source(calibration, inputs_model(graph))
        calib, holdout = (None, None)
        if source is not None:
            holdout_count = options.calibration.holdout if len(source) > options.calibration.holdout else 0
            calib, holdout = split(source, holdout_count)
            if len(calib) == 0:
                raise OptionError("no calibration samples left after setting aside verification samples")
        timing = TimingInstrument()
        ctx = PassContext(target=target, seed=options.calibration.seed,
                          instruments=[*instruments, timing, ReleasePagesInstrument()])
        if calib is not None:
            ctx.artifacts[CALIBRATION_DATA] = calib
        result = build_pipeline(target, options)(graph, ctx)
        graph = result.graph
        record_input_shapes(graph, shapes.recorded)
        _record_execution(graph, target)
        validate(graph, target)
        report = _report(model, target, options, ctx, timing)
        if shapes.note:
            report.notes.append(shapes.note)
        compiled_path = Path(tmp) / "compiled.onnx"
        save(graph, compiled_path)
        report.compiled_bytes = _model_bytes(compiled_path)
        report.float_bytes = _model_bytes(float_path)
        if options.verify:
            # Synthetic feeds take the compiled model's inputs: the fixed shapes where there are any.
            feeds, synthetic = _verification_feeds(holdout, compiled_path if shapes.fixed else float_path, options)
            report.verification = compare_with_float(float_path, compiled_path, feeds, threads=options.threads,
                                                     synthetic=synthetic, execution=target.execution)
            report.fusion = check_placement(compiled_path, target.execution, options.threads)
    return Compiled(graph, report, target)


def _record_execution(graph: Graph, target: Target) -> None:
    """The target and execution in the model metadata, for eval and bench to run it there."""
    if graph.model is None:
        return
    entries = {TARGET_KEY: target.name, PROVIDER_KEY: target.execution.name}
    kept = [(k, v) for k, v in graph.model.metadata_props if k not in entries]
    graph.model.metadata_props = kept + list(entries.items())


def _float_model_path(model, graph: Graph, tmp: Path) -> Path:
    """A file of the float model for ONNX Runtime (the user's own file when there is one)."""
    if isinstance(model, (str, os.PathLike)):
        return Path(model)
    path = tmp / "float.onnx"
    save(graph, path)
    return path


def _reopenable(calibration: Any) -> bool:
    """Whether the calibration spec can be opened again (a path, token windows, a list)."""
    from edgeq.calibration.sources import TextWindows, TokenWindows

    return isinstance(calibration, (str, os.PathLike, TokenWindows, TextWindows, list, tuple))


def _model_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _verification_feeds(holdout, float_path: Path, options: CompileOptions):
    if holdout is not None and len(holdout):
        return list(holdout), False
    return synthetic_feeds(float_path, 2, seed=options.calibration.seed), True


def _report(model, target: Target, options: CompileOptions, ctx: PassContext, timing: TimingInstrument) -> Report:
    plan = ctx.artifacts.get(QUANT_PLAN)
    report = Report(model=str(model) if isinstance(model, (str, os.PathLike)) else "<in-memory model>",
                    target=target.name, scheme=plan.scheme.label if plan else "float",
                    provider=target.execution.name,
                    options=_options_dict(options), passes=pass_rows(ctx.records, timing.seconds))
    if plan is not None:
        report.sensitivity = [vars(item) for item in ctx.artifacts.get(SENSITIVITY, [])]
        report.quantized_ops = count_kinds(p.op for p in plan.ops)
        report.kept_high = kept_high_by_reason(plan.kept_high)
        report.roles = plan.roles.counts()
    report.notes.extend(target.notes)
    return report


def _options_dict(options: CompileOptions) -> dict[str, Any]:
    data = asdict(options)
    data["overrides"] = {k: v for k, v in data["overrides"].items() if v}
    return data
