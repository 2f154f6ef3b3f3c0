"""Latency and throughput of float and compiled models on their runtimes, measured in one run.

Every row is one (model, execution, precision) session, all open at once; after a warm-up the
rows run round robin (one inference of each per round), so a change of machine load touches
every row alike, and each row reports the median, quartiles and extremes of its rounds.

Rows (`plan_rows`):
- a compiled model (one with edgeq's target metadata) runs on its execution with the deployment
  settings: the recorded provider, or each one asked for;
- a float model runs on every float path the target's runtimes offer here: ONNX Runtime's CPU
  provider in fp32, and a runtime with a precision hint (OpenVINO) in f32 and, where the CPU has
  bf16 instructions (AVX512_BF16, AMX-BF16), in bf16. The fastest float row is the baseline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import onnx

from edgeq.errors import OptionError
from edgeq.metadata import PROVIDER_KEY, TARGET_KEY, recorded_input_shapes
from edgeq.runtime.providers import CPU, availability
from edgeq.runtime.execution import Execution

if TYPE_CHECKING:
    from edgeq.targets.base import Target

TEXT_DEFAULT = (1, 128)   # batch x sequence of a text model whose shapes nothing fixes
_INT_TYPES = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


@dataclass(frozen=True)
class ModelInfo:
    """What bench reads from a model file: its inputs and what a compile recorded."""

    path: Path
    inputs: tuple[tuple[str, int, tuple], ...]     # (name, elem type, dims: int or dim name/None)
    target: str | None
    provider: str | None
    shapes: dict[str, list[int]]
    id_limits: dict[str, int] = field(default_factory=dict)  # rows of the table an integer input indexes

    @classmethod
    def read(cls, path: str | os.PathLike) -> "ModelInfo":
        from edgeq.calibration.float_model import load_model

        proto, _ = load_model(path)
        weights = {t.name for t in proto.graph.initializer}
        inputs = []
        for value in proto.graph.input:
            if value.name in weights:
                continue
            tensor = value.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
            inputs.append((value.name, tensor.elem_type, dims))
        meta = {p.key: p.value for p in proto.metadata_props}
        tables = {t.name: t.dims[0] for t in proto.graph.initializer if t.dims}
        limits = {}
        for node in proto.graph.node:  # an embedding lookup: Gather(table, ids)
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[0] in tables:
                limits[node.input[1]] = min(limits.get(node.input[1], 1 << 62), tables[node.input[0]])
        return cls(Path(path), tuple(inputs), meta.get(TARGET_KEY), meta.get(PROVIDER_KEY),
                   recorded_input_shapes(meta), limits)

    @property
    def compiled(self) -> bool:
        return self.target is not None


@dataclass(frozen=True)
class RowSpec:
    label: str
    model: Path
    kind: str                 # "float" or "compiled"
    execution: Execution
    precision: str            # what float ops run in: fp32, f32, bf16
    reference: bool = False   # the execution's full-precision (reference) settings


@dataclass
class RowResult:
    spec: RowSpec
    seconds: list[float] = field(default_factory=list)
    via: str = ""

    def stat(self, q: float) -> float:
        return float(np.quantile(self.seconds, q)) if self.seconds else float("nan")

    @property
    def median(self) -> float:
        return self.stat(0.5)


@dataclass
class BenchResult:
    rows: list[RowResult]
    shapes: dict[str, list[int]]
    shapes_from: str
    threads: int
    warmup: int
    repeats: int
    notes: list[str] = field(default_factory=list)

    @property
    def baseline(self) -> RowResult | None:
        """The fastest float row: the best float path on this machine."""
        floats = [r for r in self.rows if r.spec.kind == "float" and r.seconds]
        return min(floats, key=lambda r: r.median) if floats else None

    @property
    def cpu_float(self) -> RowResult | None:
        return next((r for r in self.rows if r.spec.kind == "float" and r.spec.execution.plugin is None
                     and r.seconds), None)

    def batch(self) -> int:
        return next((dims[0] for dims in self.shapes.values() if dims), 1)

    def to_dict(self) -> dict:
        base, cpu = self.baseline, self.cpu_float
        rows = []
        for r in self.rows:
            rows.append({
                "label": r.spec.label, "model": str(r.spec.model), "kind": r.spec.kind,
                "provider": r.spec.execution.provider, "execution": r.spec.execution.name, "via": r.via,
                "precision": r.spec.precision, "median_ms": 1e3 * r.median, "q1_ms": 1e3 * r.stat(0.25),
                "q3_ms": 1e3 * r.stat(0.75), "min_ms": 1e3 * r.stat(0.0), "max_ms": 1e3 * r.stat(1.0),
                "samples_per_s": self.batch() / r.median if r.seconds else None,
                "vs_best_float": base.median / r.median if base and r.seconds else None,
                "vs_cpu_float": cpu.median / r.median if cpu and r.seconds else None,
                "runs_ms": [1e3 * s for s in r.seconds]})
        return {"shapes": self.shapes, "shapes_from": self.shapes_from, "threads": self.threads,
                "warmup": self.warmup, "repeats": self.repeats, "rows": rows,
                "baseline": (f"{base.spec.label} on {base.spec.execution.provider} {base.spec.precision}"
                             if base else None), "notes": self.notes}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        data = self.to_dict()
        shapes = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in self.shapes.items())
        lines = [f"shapes {shapes} ({self.shapes_from}); threads {self.threads or 'runtime default'}; "
                 f"{self.warmup} warm-up, {self.repeats} interleaved rounds",
                 "| model | runtime | median ms | IQR ms | min-max ms | samples/s | vs best float | vs ORT CPU float |",
                 "|---|---|---:|---:|---:|---:|---:|---:|"]
        for row in data["rows"]:
            def ratio(x):
                return f"{x:.2f}x" if x else "-"
            runtime = f"{row['provider']} {row['precision']}" + (f" ({row['via']})" if row["via"] not in
                                                                  ("", "onnxruntime") else "")
            lines.append(f"| {row['label']} | {runtime} | {row['median_ms']:.1f} | {row['q1_ms']:.1f}-"
                         f"{row['q3_ms']:.1f} | {row['min_ms']:.1f}-{row['max_ms']:.1f} | "
                         f"{row['samples_per_s'] or 0:.1f} | {ratio(row['vs_best_float'])} | "
                         f"{ratio(row['vs_cpu_float'])} |")
        if data["baseline"]:
            lines.append(f"baseline (best float path here): {data['baseline']}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---- rows ----------------------------------------------------------------------------------

def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512_BF16 or AMX-BF16)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return False
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def with_hint(execution: Execution, hint: str) -> Execution:
    config = execution.device_config
    return dataclasses.replace(execution, device_config=dataclasses.replace(config, precision_hint=hint))


def plan_rows(models: Sequence[ModelInfo], target: Target | None, providers: Sequence[str] = (),
              *, bf16: bool | None = None, notes: list[str] | None = None) -> list[RowSpec]:
    """The rows for `models` (see the module notes); executions that cannot run here are left
    out with a note."""
    notes = notes if notes is not None else []
    bf16 = cpu_has_bf16() if bf16 is None else bf16
    executions = list(target.executions) if target is not None else [CPU]
    if not any(e.plugin is None and e.provider == "CPUExecutionProvider" for e in executions):
        executions.append(CPU)
    runnable = []
    for execution in executions:
        found = availability(execution)
        if found.runs:
            runnable.append(execution)
        else:
            notes.append(f"{execution.name}: not measured, {found.reason}")
    rows: list[RowSpec] = []
    for info in models:
        stem = info.path.name
        if not info.compiled:
            for execution in runnable:
                if execution.device_config is None:
                    rows.append(RowSpec(f"{stem} float", info.path, "float", execution, "fp32"))
                    continue
                rows.append(RowSpec(f"{stem} float", info.path, "float", execution, "f32", reference=True))
                if bf16:
                    rows.append(RowSpec(f"{stem} float", info.path, "float", with_hint(execution, "bf16"), "bf16"))
            continue
        names = list(providers) or [info.provider or (runnable[0].name if runnable else "cpu")]
        for name in names:
            execution = next((e for e in runnable if e.name == name), None)
            if execution is None:
                if target is not None:
                    target.execution_named(name)  # an unknown name is an error; a known one is noted above
                continue
            hint = execution.device_config.precision_hint if execution.device_config else None
            rows.append(RowSpec(f"{stem} ({info.target})", info.path, "compiled", execution,
                                {"bf16": "bf16", "f32": "f32"}.get(hint or "", "fp32")))
    return rows


# ---- feeds ---------------------------------------------------------------------------------

def resolve_shapes(info: ModelInfo, given: Mapping[str, Sequence[int]],
                   recorded: Mapping[str, Sequence[int]] | None = None) -> tuple[dict[str, list[int]], str]:
    """Input shapes: --shape, else the compile's recorded shapes (this model's, else `recorded`,
    those of the other models measured with it), else batch 1 x 128 for a text model (integer
    inputs of rank 2); the second item says where they came from."""
    recorded = {**(recorded or {}), **info.shapes}
    shapes: dict[str, list[int]] = {}
    sources = set()
    named: dict[str, int] = {}  # a dim name's size, from the inputs given (batch, sequence, ...)
    for name, _, dims in info.inputs:
        if name in given and len(given[name]) == len(dims):
            named.update({d: v for d, v in zip(dims, given[name]) if isinstance(d, str)})
    for name, elem, dims in info.inputs:
        follows = bool(named) and all(isinstance(d, int) and d > 0 or d in named for d in dims)
        if name not in given and follows and any(isinstance(d, str) for d in dims):
            shapes[name] = [d if isinstance(d, int) and d > 0 else named[d] for d in dims]
            sources.add("--shape")
        elif name in given:
            shapes[name] = list(given[name])
            sources.add("--shape")
        elif all(isinstance(d, int) and d > 0 for d in dims):
            shapes[name] = list(dims)
            sources.add("the model's static shapes")
        elif name in recorded:
            shapes[name] = list(recorded[name])
            sources.add("recorded by the compile (edgeq.input_shapes)")
        elif elem in _INT_TYPES and len(dims) == 2:
            shapes[name] = list(TEXT_DEFAULT)
            sources.add(f"default for text models: batch {TEXT_DEFAULT[0]} x {TEXT_DEFAULT[1]} tokens")
        else:
            raise OptionError(f"input {name} of {info.path.name} has dynamic dims {list(dims)}",
                              fix=f"pass --shape {name}=D0,D1,...")
    return shapes, "; ".join(sorted(sources))


def make_feed(info: ModelInfo, shapes: Mapping[str, Sequence[int]], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the given shapes: token ids in 100..999 (within the embedding table an input
    indexes, where one does), a full attention mask, zero token types,
    positions 0..S-1, N(0,1) floats."""
    rng = np.random.default_rng(seed)
    feed = {}
    for name, elem, _ in info.inputs:
        shape = list(shapes[name])
        lowered = name.lower()
        if elem in _INT_TYPES:
            dtype = _INT_TYPES[elem]
            if "mask" in lowered:
                feed[name] = np.ones(shape, dtype)
            elif "type" in lowered:
                feed[name] = np.zeros(shape, dtype)
            elif "position" in lowered:
                feed[name] = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
            else:
                limit = min(1000, info.id_limits.get(name, 1000))
                feed[name] = rng.integers(min(100, limit // 2), limit, shape).astype(dtype)
        elif elem == onnx.TensorProto.BOOL:
            feed[name] = np.ones(shape, np.bool_)
        else:
            feed[name] = rng.standard_normal(shape).astype(_FLOAT_TYPES.get(elem, np.float32))
    return feed


# ---- running -------------------------------------------------------------------------------

def run_rows(rows: Sequence[RowSpec], feeds: Mapping[Path, Mapping[str, np.ndarray]], *, threads: int = 0,
             warmup: int = 2, repeats: int = 9, progress: bool | None = None) -> list[RowResult]:
    """Open every row's session, warm each up, then time `repeats` rounds of one run per row."""
    from edgeq.runtime.providers import availability as found
    from edgeq.runtime.sessions import make_session

    if repeats < 1 or warmup < 0:
        raise OptionError(f"repeats={repeats}, warmup={warmup}", fix="use --repeats >= 1 and --warmup >= 0")
    sessions = []
    results = []
    for spec in rows:
        session = make_session(str(spec.model), threads, execution=spec.execution, reference=spec.reference)
        via = found(spec.execution).via or ""
        results.append(RowResult(spec, via="openvino package" if via == "direct" else via))
        sessions.append(session)
    show = sys.stderr.isatty() if progress is None else progress
    total = len(rows) * (warmup + repeats)
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="bench", unit="run", leave=False)
    try:
        for _ in range(warmup):
            for session, spec in zip(sessions, rows):
                session.run(None, dict(feeds[spec.model]))
                if bar is not None:
                    bar.update()
        for _ in range(repeats):
            for session, spec, result in zip(sessions, rows, results):
                feed = dict(feeds[spec.model])
                start = time.perf_counter()
                session.run(None, feed)
                result.seconds.append(time.perf_counter() - start)
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()
    return results


def bench(paths: Sequence[str | os.PathLike], target: Target | None = None, *, providers: Sequence[str] = (),
          threads: int = 0, shapes: Mapping[str, Sequence[int]] | None = None, warmup: int = 2,
          repeats: int = 9, progress: bool | None = None, bf16: bool | None = None) -> BenchResult:
    """Measure `paths` (float and compiled models) on their runtimes; see the module notes. The
    target is `target`, else the one the compiled models recorded."""
    from edgeq.registry import get_target

    if not paths:
        raise OptionError("no model to measure", fix="give one or more .onnx files")
    infos = [ModelInfo.read(p) for p in paths]
    recorded = sorted({i.target for i in infos if i.compiled})
    if target is None and recorded:
        if len(recorded) > 1:
            raise OptionError(f"the models were compiled for several targets ({', '.join(recorded)})",
                              fix="pass --target T")
        target = get_target(recorded[0])
    notes: list[str] = []
    if target is None:
        notes.append("no target given or recorded: float rows on ONNX Runtime's CPU provider only")
    rows = plan_rows(infos, target, providers, bf16=bf16, notes=notes)
    given = {k: list(v) for k, v in (shapes or {}).items()}
    names = {n for info in infos for n, _, _ in info.inputs}
    unknown = sorted(set(given) - names)
    if unknown:
        raise OptionError(f"--shape names no model input {unknown[0]!r}", fix=f"inputs are {', '.join(sorted(names))}")
    recorded = {k: v for info in infos for k, v in info.shapes.items()}
    all_shapes: dict[str, list[int]] = {}
    feeds: dict[Path, dict[str, np.ndarray]] = {}
    sources = []
    for info in infos:
        model_shapes, source = resolve_shapes(info, {k: v for k, v in given.items()
                                                     if k in {n for n, _, _ in info.inputs}}, recorded)
        feeds[info.path] = make_feed(info, model_shapes)
        all_shapes.update(model_shapes)
        sources.append(source)
    results = run_rows(rows, feeds, threads=threads, warmup=warmup, repeats=repeats, progress=progress)
    return BenchResult(results, all_shapes, "; ".join(dict.fromkeys(sources)), threads, warmup, repeats, notes)
