"""`edgeq.compile`: the one entry point from a float model to a verified quantized model."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from datetime import datetime, timezone
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import onnx

from edgeq.errors import CalibrationError, OptionError
from edgeq.frontend.functions import inline_functions
from edgeq.frontend.shapes import (first_sample_shapes, fix_input_shapes, inputs_model, record_input_shapes,
                                   resolve_input_shapes)
from edgeq.ir import Graph, clone_graph, load, save, to_model_proto
from edgeq.options import CompileOptions, range_method
from edgeq.quant.budget import FLOAT_FILE_BYTES, LATENCY_BUDGET, LINEAR_LATENCIES, SIZE_BUDGET, offered_dtypes
from edgeq.quant.plan import Scheme
from edgeq.pipeline import Instrument, Pass, PassContext, PassManager, ReleasePagesInstrument, TimingInstrument
from edgeq.pipeline.artifacts import (CALIBRATION_DATA, OUTLIER_COLUMNS, QUANT_PLAN, ROTATION, ROTATION_DECLINED,
                                      SENSITIVITY, SMOOTHING)
from edgeq.registry import get_pass, get_target
from edgeq.report import Report, count_kinds, kept_high_by_reason, pass_rows, runtime_versions
from edgeq.runtime.feeds import synthetic_feeds
from edgeq.metadata import (CALIBRATION_KEY, DEVICE_KEY, FLOAT_SHA256_KEY, OPTIONS_KEY, PROVIDER_KEY, SCHEME_KEY,
                            TARGET_KEY, VERSION_KEY)
from edgeq.runtime.placement import check_placement
from edgeq.runtime.providers import for_device, resolve as resolve_execution
from edgeq.runtime.verification import compare_with_float
from edgeq.targets.base import Target, validate


@dataclass
class Compiled:
    graph: Graph
    report: Report
    target: Target

    def save(self, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
        written = save(self.graph, path, external_data=external_data)
        self.report.output = str(written)
        return written


def build_pipeline(target: Target, options: CompileOptions) -> PassManager:
    """The target's default pipeline, each pass built from the typed options."""
    passes: list[Pass] = []
    names = list(target.default_pipeline)
    if "select-precision" in names:
        # the per-layer widths are chosen right after the plan is made, before any weight is rounded
        for budget, pass_name in ((options.size_budget, "size-budget"), (options.latency_budget, "latency-budget")):
            if budget is not None:
                names.insert(names.index("select-precision") + 1, pass_name)
    for name in names:
        cls = get_pass(name)
        factory = getattr(cls, "from_options", None)
        passes.append(factory(options, target) if factory else cls())
    return PassManager(passes, name=f"{target.name}-pipeline")


def compile(model: str | os.PathLike | onnx.ModelProto | Graph, target: str | Target,
            options: CompileOptions | None = None, *, calibration: Any = None,
            instruments: Sequence[Instrument] = (), provider: str | None = None,
            device: str | None = None, cost_device: str | None = None) -> Compiled:
    """Quantize `model` for `target`. `calibration`: a path (.npz dir/file), a text-window spec,
    an iterable of feed dicts, or an ORT CalibrationDataReader. `instruments` observe the
    pipeline (edgeq.pipeline.instruments); the compile adds its own timing and page release.
    `provider` names one of the target's executions (default: the first that runs here); the
    output follows its QDQ layout, and calibration, verification and the placement check run on it.
    `device` names one of that execution's devices (an NPU generation or SoC; default: its first).
    `cost_device` names the part or board a device cost model prices (the fpga target's), which
    --latency-budget needs. The input is never modified."""
    from edgeq.calibration.sources import open_source, split

    started = time.perf_counter()
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    options = options or CompileOptions()
    target = get_target(target) if isinstance(target, str) else target
    target = target.on(for_device(resolve_execution(target, provider), device))
    scheme = Scheme.resolve(target, options)  # options the target cannot take fail before any work
    if options.latency_budget is not None:
        _check_latency_budget(target, scheme, cost_device)
    if options.decompose_outliers is not None and "decompose-outliers" not in target.default_pipeline:
        raise OptionError(f"{target.name} does not take --decompose-outliers (its pipeline has no float side path)",
                          fix="compile without it, or for a target whose pipeline has it (`edgeq targets show T`)")
    progress = PassContext(instruments=list(instruments))  # the compile's own steps, outside passes
    stages: dict[str, float] = {}
    with progress.task("load"), _timed(stages, "load"):
        graph = clone_graph(model) if isinstance(model, Graph) else load(model)
        inline_functions(graph)  # the front end sees inside function-wrapped blocks
    with tempfile.TemporaryDirectory(prefix="edgeq-compile-") as tmp:
        float_path = _float_model_path(model, graph, Path(tmp))
        # every sample's metadata is checked here, before the pipeline (text: tokenized here)
        with progress.task("calibration data"), _timed(stages, "calibration data"):
            source = open_source(calibration, str(float_path)) if calibration is not None else None
        shapes = resolve_input_shapes(graph, dict(options.input_shapes), static=target.static_shapes,
                                      sample=first_sample_shapes(source), target_name=target.name)
        if source is None:
            check_calibration_needed(graph, target, options, scheme)
        if shapes.fixed:
            fix_input_shapes(graph, shapes.fixed)
            if source is not None and _reopenable(calibration):  # every sample must have the fixed shapes
                source = open_source(calibration, inputs_model(graph))
        calib, holdout = (None, None)
        pipeline = build_pipeline(target, options)
        data_note = None
        if source is not None:
            # a KV-cache decoder's window is a prefill and its decode steps: hold out whole windows
            holdout_count = options.calibration.holdout * _samples_per_window(source)
            holdout_count = holdout_count if len(source) > holdout_count else 0
            calib, holdout = split(source, holdout_count)
            if len(calib) == 0:
                raise OptionError("no calibration samples left after setting aside verification samples")
            wanted = max((getattr(p, "wanted_tokens", 0) for p in pipeline.passes), default=0)
            if wanted:
                with _timed(stages, "calibration data"):
                    calib, holdout, data_note = _enough_tokens(calibration, source, calib, holdout, wanted,
                                                      inputs_model(graph) if shapes.fixed else str(float_path))
        timing = TimingInstrument()
        ctx = PassContext(target=target, seed=options.calibration.seed,
                          instruments=[*instruments, timing, ReleasePagesInstrument()])
        if calib is not None:
            ctx.artifacts[CALIBRATION_DATA] = calib
        ctx.artifacts[FLOAT_FILE_BYTES] = _model_bytes(float_path)  # what a --size-budget ratio is of
        if options.latency_budget is not None:
            with progress.task("latency of each width"), _timed(stages, "latency of each width"):
                ctx.artifacts[LINEAR_LATENCIES] = _linear_latencies(graph, target, options, calib, cost_device,
                                                                    shapes.recorded)
        pipeline_start = time.perf_counter()
        result = pipeline(graph, ctx)
        stages["pipeline"] = time.perf_counter() - pipeline_start
        graph = result.graph
        with progress.task("validate"), _timed(stages, "validate"):
            record_input_shapes(graph, shapes.recorded)
            validate(graph, target)
        report = _report(model, target, options, ctx, timing)
        report.date = date
        report.calibration = _calibration_record(calibration, calib, holdout)
        with progress.task("float model hash"), _timed(stages, "float model hash"):
            float_hash = file_sha256(float_path)
        _record_provenance(graph, target, report, float_hash)
        for note in (shapes.note, data_note):
            if note:
                report.notes.append(note)
        compiled_path = Path(tmp) / "compiled.onnx"
        with progress.task("save"), _timed(stages, "save"):
            save(graph, compiled_path)
        report.compiled_bytes = _model_bytes(compiled_path)
        report.float_bytes = _model_bytes(float_path)
        budget = ctx.artifacts.get(SIZE_BUDGET)
        if budget is not None:
            report.notes.append(f"size budget {budget.budget_bytes / 1e6:.1f} MB: the model is "
                                f"{report.compiled_bytes / 1e6:.1f} MB ({'within' if report.compiled_bytes <= budget.budget_bytes else 'OVER'}"
                                f" the budget; {budget.total_bytes / 1e6:.1f} MB estimated)")
        latency = ctx.artifacts.get(LATENCY_BUDGET)
        if latency is not None:
            actual = _estimated_seconds(graph, target, cost_device)
            report.notes.append(f"latency budget {1e3 * latency.budget_s:g} ms on {latency.device}: the compiled model "
                                f"is estimated at {1e3 * actual:.3f} ms ({'within' if actual <= latency.budget_s else 'OVER'}"
                                f" the budget; {1e3 * latency.estimated_s:.3f} ms when the widths were chosen)")
        if options.verify:
            # Synthetic feeds take the compiled model's inputs: the fixed shapes where there are any.
            feeds, synthetic = _verification_feeds(holdout, compiled_path if shapes.fixed else float_path, options)
            with _timed(stages, "verification"):
                report.verification = compare_with_float(float_path, compiled_path, feeds, threads=options.threads,
                                                         synthetic=synthetic, execution=target.execution,
                                                         progress=progress)
            with progress.task("placement check"), _timed(stages, "placement check"):
                report.fusion = check_placement(compiled_path, target.execution, options.threads)
    report.stage_seconds = stages
    report.total_seconds = time.perf_counter() - started
    return Compiled(graph, report, target)


def _check_latency_budget(target: Target, scheme: Scheme, cost_device: str | None) -> None:
    """--latency-budget's preconditions, before any work: a cost model that prices a device, the
    device, a plan, and more than one weight width to choose from."""
    if target.cost_model is None or not target.cost_model.needs_device or "select-precision" not in target.default_pipeline:
        raise OptionError(f"{target.name} does not take --latency-budget: its cost model prices no layer's latency "
                          "on a device", fix="use a target whose cost model prices a device (fpga), or --size-budget")
    if cost_device is None:
        raise OptionError("--latency-budget is a latency on a device", fix="add --device D")
    dtypes = offered_dtypes(target, scheme.weight_dtype)
    if len(dtypes) < 2:
        raise OptionError(f"--latency-budget chooses each linear's weight width, and {scheme.weight_dtype} weights "
                          f"leave one ({', '.join(dtypes) or 'none'})",
                          fix="add --weights int4 (linears then take int4 or int8)")


def _linear_latencies(graph: Graph, target: Target, options: CompileOptions, calib: Any, device: str,
                      recorded_shapes: Any):
    """Each linear's latency at each offered width on `device`: a compile at the preset's widths
    (round to nearest: the weights' values do not change a latency), priced by the target's cost model."""
    dtypes = offered_dtypes(target, Scheme.resolve(target, options).weight_dtype)
    probe_options = replace(options, latency_budget=None, weight_rounding="rtn")
    ctx = PassContext(target=target, seed=options.calibration.seed)
    if calib is not None:
        ctx.artifacts[CALIBRATION_DATA] = calib
    probe = build_pipeline(target, probe_options)(clone_graph(graph), ctx).graph
    record_input_shapes(probe, recorded_shapes)  # the estimate's sizes: the shapes the compile records
    return target.cost_model.linear_latencies(to_model_proto(probe), device=device, dtypes=dtypes)


def _estimated_seconds(graph: Graph, target: Target, device: str) -> float:
    report = target.cost_model.estimate(to_model_proto(graph), device=device)
    return report.latency_cycles / (report.clock_mhz * 1e6)


def check_calibration_needed(graph: Graph, target: Target, options: CompileOptions, scheme: Scheme | None = None) -> None:
    """Fail before any work when the compile will need calibration data and has none: activation
    ranges (any op the scheme quantizes with activations), or weight rounding that measures the
    layer inputs (--weight-rounding gptq/awq/awq+gptq)."""
    scheme = scheme or Scheme.resolve(target, options)
    kinds = {kind for kind, rule in scheme.rules.items() if any(spec is not None for spec in rule.activations)}
    quantized = sorted({op.op_type for op in graph.ops() if op.op_type in kinds and not op.domain})
    how = "pass --calib DIR|FILE.npz (samples keyed by input name) or --calib-text FILE --tokenizer tokenizer.json"
    if quantized and "calibrate" in target.default_pipeline:
        raise CalibrationError(
            f"{scheme.label} quantizes the activations of the model's {', '.join(quantized)} ops, whose ranges come "
            "from calibration data, and none was given",
            fix=how + (", or --activations float for weight-only" if options.activations != "float" else ""))
    if options.weight_rounding in ("gptq", "awq", "awq+gptq"):
        raise CalibrationError(f"--weight-rounding {options.weight_rounding} measures the layer inputs on calibration "
                               "data, and none was given", fix=how + ", or --weight-rounding rtn")


@contextmanager
def _timed(stages: dict[str, float], name: str) -> Iterator[None]:
    """Times one step of the compile into `stages[name]`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - start


def _record_provenance(graph: Graph, target: Target, report: Report, float_hash: str) -> None:
    """Where the model came from, in its metadata (deterministic: no date, no output path):
    producer edgeq and its version, the target and execution (eval and bench run it there),
    the scheme, the options given, the calibration source and counts, the float model's hash."""
    if graph.model is None:
        return
    from edgeq.version import __version__

    graph.model.producer_name = "edgeq"
    graph.model.producer_version = __version__
    entries = {VERSION_KEY: __version__, TARGET_KEY: target.name, PROVIDER_KEY: target.execution.name,
               SCHEME_KEY: report.scheme, OPTIONS_KEY: json.dumps(report.options, sort_keys=True, default=str),
               CALIBRATION_KEY: json.dumps(report.calibration, sort_keys=True, default=str),
               FLOAT_SHA256_KEY: float_hash}
    if target.execution.device is not None:  # the NPU generation / SoC it was compiled for
        entries[DEVICE_KEY] = target.execution.device
    kept = [(k, v) for k, v in graph.model.metadata_props if k not in entries]
    graph.model.metadata_props = kept + list(entries.items())


def file_sha256(path: Path) -> str:
    """SHA-256 of a model file and, after it, of its external data file (`<file>.data`) if any."""
    digest = hashlib.sha256()
    for part in (path, path.with_name(path.name + ".data")):
        if part.exists():
            with open(part, "rb") as handle:
                while chunk := handle.read(1 << 22):
                    digest.update(chunk)
    return digest.hexdigest()


def _enough_tokens(spec: Any, source, calib, holdout, wanted: int, model) -> tuple[Any, Any, str | None]:
    """Calibration samples with at least `wanted` tokens where the data allows: token windows
    are extended by more windows of the same text and split again, the last ones held out, so
    the compile is the one `--samples N` gives (the same windows calibrate); other data is kept
    and a note says how many samples to give. Returns (calibration, held-out samples, note or None)."""
    from dataclasses import replace

    from edgeq.calibration.sources import TextWindows, TokenWindows, open_source, split

    per_window = _samples_per_window(source)
    # a KV-cache decoder's window (its prefill and decode steps) holds seq_len tokens, as a sample does without
    per_sample = spec.seq_len if per_window > 1 else _tokens_per_sample(calib)
    windows = len(calib) // per_window
    if per_sample is None or windows * per_sample >= wanted:
        return calib, holdout, None
    have = windows * per_sample
    need = -(-wanted // per_sample)
    why = (f"the weights are rounded with GPTQ, whose layer statistics need about {wanted} calibration tokens "
           f"(SmolLM2 W4A16: +14% perplexity from 16 windows of 256 tokens, +8 to +11% from 64)")
    if isinstance(spec, (TextWindows, TokenWindows)):
        extra = need - windows
        try:
            extended = open_source(replace(spec, num_samples=spec.num_samples + extra), model)
        except CalibrationError:
            extended = None  # the text has no more windows: say so below
        if extended is not None:
            calib, holdout = split(extended, len(holdout or ()))
            held = len(holdout) // per_window
            first, last = spec.first_window, spec.first_window + len(extended) // per_window - 1
            note = (f"{why}: {windows} calibration windows give {have}, so {extra} more windows of the "
                    f"same text were drawn: windows {first}..{last - held} calibrate"
                    + (f" and {last - held + 1}..{last} are held out" if held else "")
                    + f", as --samples {spec.num_samples + extra} gives")
            return calib, holdout, note
    return calib, holdout, (f"{why}: the {len(calib)} calibration samples give {have}; expect a larger error, and give "
                            f"about {need} samples of {per_sample} tokens")


def _samples_per_window(source) -> int:
    """Samples one token window gives: its prefill and decode steps for a KV-cache decoder, else 1."""
    cache = getattr(source, "cache", None)
    return cache.per_window() if cache is not None else 1


def _tokens_per_sample(samples) -> int | None:
    """Tokens in one sample (its input_ids' size), None for a model without input_ids."""
    for feed in samples:
        ids = feed.get("input_ids")
        return int(ids.size) if ids is not None else None
    return None


def _calibration_record(spec: Any, calib, holdout) -> dict[str, Any] | None:
    """The calibration data as the report and the model metadata name it: source, kind, the
    samples calibrating and those held out for verification (named)."""
    from edgeq.calibration.sources import TextWindows, TokenWindows

    if spec is None:
        return None
    record: dict[str, Any]
    if isinstance(spec, TextWindows):
        record = {"kind": "text windows", "source": str(spec.text), "tokenizer": str(spec.tokenizer),
                  "seq_len": spec.seq_len, "first_window": spec.first_window, "windows": spec.num_samples}
    elif isinstance(spec, TokenWindows):
        source = str(spec.ids) if isinstance(spec.ids, (str, os.PathLike)) else "token id array"
        record = {"kind": "token windows", "source": source, "seq_len": spec.seq_len,
                  "first_window": spec.first_window, "windows": spec.num_samples}
    elif isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        record = {"kind": ".npz directory" if path.is_dir() else "stacked .npz", "source": str(spec)}
    else:
        record = {"kind": "samples given in Python", "source": type(spec).__name__}
    record["calibration_samples"] = len(calib) if calib is not None else 0
    record["held_out"] = _sample_names(holdout)
    return record


def _sample_names(source) -> list[str]:
    if source is None or not len(source):
        return []
    return list(source.sample_names())


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
                    options=given_options(options), passes=pass_rows(ctx.records, timing.seconds),
                    versions=runtime_versions(target.execution))
    if plan is not None:
        report.sensitivity = [vars(item) for item in ctx.artifacts.get(SENSITIVITY, [])]
        report.quantized_ops = count_kinds(p.op for p in plan.ops)
        report.kept_high = kept_high_by_reason(plan.kept_high)
        report.roles = plan.roles.counts()
        for budget in (ctx.artifacts.get(SIZE_BUDGET), ctx.artifacts.get(LATENCY_BUDGET)):
            for weight, dtype in (budget.widths.items() if budget is not None else ()):
                report.weight_widths.setdefault(dtype, []).append(weight)
    report.settings = _settings(target, options, ctx)
    declined = ctx.artifacts.get(ROTATION_DECLINED)
    if declined:
        report.notes.append(declined)
    report.notes.extend(target.notes)
    return report


def given_options(options: CompileOptions) -> dict[str, Any]:
    """The options that differ from the defaults, by field name (nested ones as
    "calibration.method"): what was asked for, without the unset ones."""
    return _differences(options, CompileOptions())


def _differences(options: Any, defaults: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(options):
        value, default = getattr(options, f.name), getattr(defaults, f.name)
        if is_dataclass(value) and is_dataclass(default):
            out.update(_differences(value, default, f"{prefix}{f.name}."))
        elif value != default:
            out[prefix + f.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return {k: _plain(v) for k, v in asdict(value).items() if v is not None}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _settings(target: Target, options: CompileOptions, ctx: PassContext) -> dict[str, str]:
    """What the compile did, option by option, in words (the report's Options section): the
    scheme's specs, ranges, smoothing, rotation and rounding as they were decided."""
    plan = ctx.artifacts.get(QUANT_PLAN)
    scheme = plan.scheme if plan is not None else Scheme.resolve(target, options)
    records = {r.name: r for r in ctx.records if not r.pipeline}
    linear = scheme.rules.get("MatMul") or next(iter(scheme.rules.values()), None)
    out: dict[str, str] = {"scheme": scheme.label}
    if linear is not None and linear.weight is not None:
        out["weights"] = linear.weight.describe() + ("" if options.weights else " (the target's default)")
    if scheme.head_weight is not None:
        out["LM head weights"] = scheme.head_weight.describe()
    acts = linear.activations if linear is not None else ()
    out["activations"] = (acts[0].describe() if acts and acts[0] is not None else "float (weight-only)")
    if acts:
        method, bits = options.calibration.method, acts[0].bits if acts[0] is not None else 8
        chosen = range_method(method, bits)
        out["activation ranges"] = (chosen + (f" {options.calibration.percentile}" if chosen == "percentile" else "")
                                    + (f" (auto: {bits}-bit activations)" if method == "auto" else ""))
    rotation, declined = ctx.artifacts.get(ROTATION), ctx.artifacts.get(ROTATION_DECLINED)
    asked = {True: " (--rotate)", False: " (--no-rotate)", None: " (the target's default)"}[options.rotate]
    if options.rotate is None and options.decompose_outliers is not None:
        asked = " (--decompose-outliers instead)"
    if rotation is not None:
        out["Hadamard rotation"] = f"{rotation.mode}: " + (
            f"residual stream folded (order {rotation.stream_order}), " if rotation.stream_order else "") + \
            f"{len(rotation.online)} online Hadamard(s){asked}"
    else:
        out["Hadamard rotation"] = ("not applied: no pre-norm residual stream (see the notes)" if declined
                                    else "off" + asked)
    outliers = ctx.artifacts.get(OUTLIER_COLUMNS)
    if outliers is not None:
        out["outlier decomposition"] = outliers.describe()
    smoothing = ctx.artifacts.get(SMOOTHING)
    smooth = records.get("smooth-quant")
    if options.smooth_alpha is not None:
        out["SmoothQuant"] = f"alpha {options.smooth_alpha}"
    elif smoothing is not None:
        chosen = sum(1 for a in smoothing.values() if a)
        out["SmoothQuant"] = f"alpha searched per layer: {chosen} of {len(smoothing)} group(s) smoothed"
    elif smooth is not None and smooth.stats.get("after_rotation") or (rotation is not None and smooth is not None):
        out["SmoothQuant"] = "off after the rotation (the rotation pass smooths before its online Hadamards)"
    else:
        out["SmoothQuant"] = "off"
    gptq, awq = records.get("gptq"), records.get("awq")
    if gptq is not None and gptq.stats.get("layers"):
        out["weight rounding"] = f"GPTQ ({gptq.stats['layers']} layers)" + (" act-order" if options.act_order else "")
    elif awq is not None and awq.stats.get("groups"):
        out["weight rounding"] = "AWQ"
    else:
        out["weight rounding"] = "round to nearest"
    excluded = [*options.overrides.exclude_nodes, *(f"/{r}/" for r in options.overrides.exclude_regex),
                *options.overrides.exclude_op_types]
    if excluded:
        out["kept high by request"] = ", ".join(excluded)
    if options.keep_high or options.accuracy_budget is not None or options.sensitivity:
        out["sensitivity"] = (f"keep {options.keep_high} most sensitive op(s) high" if options.keep_high else "ranked") + \
            (f", accuracy budget {options.accuracy_budget}" if options.accuracy_budget is not None else "")
    budget = ctx.artifacts.get(SIZE_BUDGET)
    if budget is not None:
        counts = budget.counts()
        out["size budget"] = (f"{budget.budget_bytes / 1e6:.1f} MB: weights " + ", ".join(
            f"{dtype} {counts[dtype]}" for dtype in ("int4", "int8", "float") if dtype in counts)
            + f" (reachable {budget.reachable[0] / 1e6:.1f}..{budget.reachable[1] / 1e6:.1f} MB)")
    latency = ctx.artifacts.get(LATENCY_BUDGET)
    if latency is not None:
        out["latency budget"] = latency.describe()
    if options.two_digit:
        out["two-digit activations"] = ", ".join(options.two_digit)
    out["verification"] = "on the held-out samples" if options.verify else "off"
    if options.threads:
        out["threads"] = str(options.threads)
    return out
