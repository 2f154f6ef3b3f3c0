"""Hadamard rotation (QuaRot) experiments on the real models: one configuration per run.

    python tools/bench_rotation.py smollm2 --weights int8 --rotate [--method minmax|percentile] --out rows.jsonl
    python tools/bench_rotation.py smollm2 --weights int8 --no-rotate                  # baseline
    python tools/bench_rotation.py smollm2 --weights int4 --rotate --rounding auto     # W4A8 g128, GPTQ
    python tools/bench_rotation.py smollm2 --weights int4 --activations float ...      # W4A16 floor
    python tools/bench_rotation.py minilm --rotate
    python tools/bench_rotation.py smollm2-float-check        # rotated float model == float model
    python tools/bench_rotation.py smollm2-stats --rotate     # per-tensor simulated int8 SQNR
Diagnostics: --exclude-regex RE (keep matching ops float), --no-eval (holdout error only),
--sensitivity (the sensitivity pass's ranking), --attention/--qk/--no-smoothrot (pass variants),
--smooth ALPHA / --smooth-search (SmoothQuant after the rotation).

SmolLM2: static per-tensor int8 activations on every linear layer (x86-vnni,
`CompileOptions(activations="int8")`), calibration `smollm2_calibration_feeds(shared, 18)` with
2 held out, perplexity on the standard protocol (windows 0..31) in a child process.
MiniLM: same activations, 16 calibration paragraphs (disjoint from the 256 evaluation ones),
cosine of the 256 paragraph embeddings against the float model's.
SmoothQuant is off unless asked (`smooth_alpha_grid=()`), whatever CompileOptions' default.

Each run appends one JSON row (command, date, options, metrics, times) to --out.
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_SHARED, load_line, machine_line  # noqa: E402

from edgeq.models import evaluation  # noqa: E402
from edgeq.models import catalog  # noqa: E402
from edgeq.options import SMOOTH_SEARCH_GRID, CalibrationOptions, CompileOptions  # noqa: E402
from edgeq.pipeline.artifacts import CALIBRATION_DATA, QUANT_PLAN


def rotation_rows(task: str, *, weights: str = "int8", rotate: bool = True, smooth: float | None = None,
                  smooth_search: bool = False, method: str = "minmax", sensitivity: bool = False,
                  shared: Path = DEFAULT_SHARED, threads: int = 0, keep: Path | None = None,
                  exclude_regex: tuple[str, ...] = (), evaluate: bool = True, activations: str = "int8",
                  rounding: str = "rtn", calib_windows: int = 16, head_weights: str = "int8") -> dict:
    """Compile one configuration and evaluate it; returns the result row. `exclude_regex`
    (diagnostics only: which ops' quantization costs the accuracy) keeps matching ops float."""
    from edgeq.compiler import compile as compile_model
    from edgeq.options import PrecisionOverrides

    options = CompileOptions(
        weights=weights, group=128 if weights == "int4" else None, activations=activations, rotate=rotate,
        smooth_alpha=smooth, smooth_alpha_grid=SMOOTH_SEARCH_GRID if smooth_search else (),
        sensitivity=sensitivity, threads=threads, weight_rounding=rounding, head_weights=head_weights,
        overrides=PrecisionOverrides(exclude_regex=tuple(exclude_regex)),
        calibration=CalibrationOptions(method=method, holdout=2))
    row: dict = {"task": task, "weights": weights, "activations": activations, "rounding": rounding,
                 "calib_windows": calib_windows, "head_weights": head_weights,
                 "rotate": rotate, "variant": dict(_VARIANT), "smooth": smooth,
                 "smooth_search": smooth_search, "method": method, "exclude_regex": list(exclude_regex),
                 "command": shlex.join([Path(sys.executable).name, *sys.argv]),
                 "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "machine": machine_line(), "load_start": load_line("at start")}
    with tempfile.TemporaryDirectory(prefix="bench-rotation-") as tmp:
        tmp = Path(tmp)
        float_path = catalog.cached("smollm2" if task == "smollm2" else "minilm")
        source = float_path
        if task == "smollm2":
            calibration = evaluation.smollm2_calibration_feeds(shared, calib_windows + 2)
        else:
            calibration = evaluation.minilm_calibration_feeds(shared, calib_windows + 2)
        start = time.perf_counter()
        compiled = compile_model(source, "x86-vnni", options, calibration=calibration)
        row["compile_s"] = time.perf_counter() - start
        out = (keep or tmp) / f"{task}-{weights}{'-rot' if rotate else ''}.onnx"
        compiled.save(out)
        report = compiled.report
        row["holdout"] = [{"output": o.name, "relative_l2": o.relative_l2, "cosine_mean": o.cosine_mean}
                          for o in (report.verification.outputs if report.verification else [])][:1]
        row["passes"] = {r.name: dict(r.stats) for r in report.passes
                         if r.name in ("hadamard-rotation", "smooth-quant", "gptq", "awq", "insert-qdq")}
        if sensitivity:
            row["sensitivity_worst"] = report.sensitivity[:15]
        if not evaluate:
            row["load_end"] = load_line("at end")
            return row
        start = time.perf_counter()
        if task == "smollm2":
            result = evaluation.evaluate_smollm2(out, shared, threads)
        else:
            reference = evaluation.evaluate_minilm(float_path, shared, threads=threads).outputs
            result = evaluation.evaluate_minilm(out, shared, reference, threads)
        row["eval_s"] = time.perf_counter() - start
        row["metrics"] = result.metrics
        row["file_mb"] = result.file_bytes / 1e6
    row["load_end"] = load_line("at end")
    return row


def float_check(task: str, shared: Path = DEFAULT_SHARED, windows: int = 2) -> dict:
    """The rotated float model (no quantization) against the float model: max relative L2 of
    the outputs on evaluation windows / paragraphs (the pass's exactness on the real model)."""
    import edgeq
    from edgeq.pipeline import PassContext, PassManager
    from edgeq.registry import get_pass
    from edgeq.passes.hadamard_rotation import HadamardRotation

    float_path = catalog.cached("smollm2" if task == "smollm2" else "minilm")
    graph = edgeq.load(float_path)
    ctx = PassContext()
    start = time.perf_counter()
    names = ("identity-elimination", "constant-folding", "dead-code-elimination", "shape-inference")
    PassManager([get_pass(n)() for n in names] + [HadamardRotation()])(graph, ctx)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="bench-rotation-") as tmp:
        path = Path(tmp) / "rotated.onnx"
        edgeq.save(graph, path)
        del graph
        reference = evaluation.session(float_path)
        rotated = evaluation.session(path)
        if task == "smollm2":
            feeds = [evaluation._lm_feeds(w[None, :]) for w in evaluation.smollm2_eval_windows(shared)[:windows]]
        else:
            inputs = evaluation.minilm_tokenize(evaluation.minilm_eval_paragraphs(shared)[:32])
            feeds = [inputs]
        errors = []
        for feed in feeds:
            for a, b in zip(reference.run(None, feed), rotated.run(None, feed)):
                a64, b64 = a.astype(np.float64), b.astype(np.float64)
                errors.append(float(np.linalg.norm(a64 - b64) / np.linalg.norm(a64)))
    record = next(r for r in ctx.records if r.name == "hadamard-rotation")
    return {"task": task, "check": "rotated float vs float", "max_relative_l2": max(errors),
            "samples": len(feeds), "pass_s": seconds, "stats": dict(record.stats),
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def activation_stats(task: str, rotate: bool, shared: Path = DEFAULT_SHARED, samples: int = 4) -> dict:
    """Per quantized activation of the W8A8 plan: simulated static per-tensor quantization
    (the plan's spec, min/max over `samples` calibration samples) of the float model's tensor
    on one further sample: SQNR in dB, peak/RMS, and the ratio of the largest token's RMS to the
    median token's (token outliers, which no channel rotation removes)."""
    import edgeq
    from edgeq.ir import to_model_proto
    from edgeq.pipeline import PassContext, PassManager
    from edgeq.passes.hadamard_rotation import HadamardRotation
    from edgeq.quant.numerics import dequantize, qparams, quantize, sqnr_db
    from edgeq.registry import get_pass, get_target
    from edgeq.runtime.sessions import make_session

    float_path = catalog.cached("smollm2" if task == "smollm2" else "minilm")
    graph = edgeq.load(float_path)
    ctx = PassContext(target=get_target("x86-vnni"))
    names = ("identity-elimination", "constant-folding", "dead-code-elimination", "shape-inference")
    from edgeq.calibration.sources import open_source
    from edgeq.passes.select_precision import SelectPrecision

    # the same calibration samples the pass's smoothing search sees in compile()
    if task == "smollm2":
        ctx.artifacts[CALIBRATION_DATA] = open_source(evaluation.smollm2_calibration_feeds(shared, 16),
                                                        str(float_path))
    else:
        ctx.artifacts[CALIBRATION_DATA] = open_source(evaluation.minilm_calibration_feeds(shared, 16),
                                                        str(float_path))
    PassManager([get_pass(n)() for n in names] + [HadamardRotation(enabled=rotate, **_VARIANT),
                SelectPrecision(CompileOptions(activations="int8"))])(graph, ctx)
    plan = ctx.artifacts[QUANT_PLAN]
    sources = plan.activation_sources(graph)
    if task == "smollm2":   # ranges from `samples` windows, measured on the next one
        feeds = evaluation.smollm2_calibration_feeds(shared, samples + 1, first=1100)
    else:
        feeds = evaluation.minilm_calibration_feeds(shared, 16 + samples + 1)[16:]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-rotation-") as tmp:
        import onnx
        path = Path(tmp) / "model.onnx"
        proto = to_model_proto(graph)
        del graph
        out_names = sorted(sources)
        del proto.graph.output[:]
        for name in out_names:
            proto.graph.output.add().name = name
        onnx.save(proto, str(path), save_as_external_data=True, location="model.onnx.data")
        del proto
        session = make_session(path, threads=0)
        lo = {n: np.inf for n in out_names}
        hi = {n: -np.inf for n in out_names}
        for feed in feeds[:samples]:
            for name, value in zip(out_names, session.run(out_names, feed)):
                lo[name] = min(lo[name], float(value.min()))
                hi[name] = max(hi[name], float(value.max()))
        test = dict(zip(out_names, session.run(out_names, feeds[samples])))
    for name in out_names:
        x = test[name].astype(np.float32)
        spec = sources[name][0][2]
        scale, zero = qparams(lo[name], hi[name], spec)
        xq = dequantize(quantize(np.clip(x, lo[name], hi[name]), scale, zero, spec), scale, zero)
        tokens = np.sqrt(np.mean(x.reshape(-1, x.shape[-1]).astype(np.float64) ** 2, axis=-1))
        rows.append({"tensor": name, "readers": sorted({p.op.name for p, _, _ in sources[name]})[:3],
                     "spec": spec.dtype, "sqnr_db": round(sqnr_db(x, xq), 2),
                     "peak_to_rms": round(float(np.abs(x).max() / np.sqrt(np.mean(x.astype(np.float64) ** 2))), 1),
                     "token_max_over_median": round(float(tokens.max() / max(np.median(tokens), 1e-30)), 1)})
    rows.sort(key=lambda r: r["sqnr_db"])
    return {"task": task, "check": "activation stats", "rotate": rotate, "variant": dict(_VARIANT),
            "tensors": len(rows),
            "median_sqnr_db": float(np.median([r["sqnr_db"] for r in rows])), "worst": rows[:25],
            "all": rows, "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


@click.command()
@click.argument("task", type=click.Choice(["smollm2", "minilm", "smollm2-float-check", "minilm-float-check",
                                           "smollm2-stats", "minilm-stats"]))
@click.option("--weights", type=click.Choice(["int8", "int4"]), default="int8", show_default=True)
@click.option("--activations", type=click.Choice(["int8", "float"]), default="int8", show_default=True)
@click.option("--rounding", type=click.Choice(["rtn", "gptq", "awq", "awq+gptq", "auto"]), default="rtn",
              show_default=True,
              help="Weight rounding (GPTQ/AWQ passes).")
@click.option("--rotate/--no-rotate", default=False)
@click.option("--smooth", type=float, help="SmoothQuant alpha.")
@click.option("--smooth-search", is_flag=True, help="SmoothQuant alpha searched per layer.")
@click.option("--method", type=click.Choice(["minmax", "percentile", "mse", "entropy"]), default="minmax",
              show_default=True)
@click.option("--exclude-regex", multiple=True, help="Diagnostics: keep ops matching this float.")
@click.option("--no-eval", is_flag=True, help="Compile and verify on the holdout only.")
@click.option("--sensitivity", is_flag=True, help="Per-op SQNR ranking (report's 15 worst ops).")
@click.option("--attention", type=click.Choice(["fold", "online", "fold+online", "none"]),
              help="Rotation of the o_proj input (default: the pass's default).")
@click.option("--qk/--no-qk", default=None, help="Online Hadamard on q/k (default: the pass's default).")
@click.option("--smoothrot/--no-smoothrot", default=None,
              help="Smoothing before the online Hadamards (default: the pass's default, on).")
@click.option("--calib-windows", type=int, default=16, show_default=True,
              help="Calibration samples (2 more are held out to verify).")
@click.option("--head-weights", type=click.Choice(["int8", "int4"]), default="int8", show_default=True)
@click.option("--gptq", "gptq_settings", multiple=True, metavar="NAME=VALUE",
              help="Experiments: set a GPTQ pass attribute (signed_scales, sequential, damp, act_order, ...).")
@click.option("--threads", type=int, default=0)
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), help="Keep the compiled model here.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Append the JSON row here.")
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path), default=DEFAULT_SHARED)
def main(task, weights, activations, rounding, rotate, smooth, smooth_search, method, exclude_regex, no_eval,
         sensitivity, attention, qk, smoothrot, calib_windows, head_weights, gptq_settings, threads, keep, out,
         shared) -> None:
    _rotation_variant(attention, qk, smoothrot)
    _gptq_variant(gptq_settings)
    if task.endswith("float-check"):
        row = float_check(task.split("-")[0], shared)
    elif task.endswith("-stats"):
        row = activation_stats(task.split("-")[0], rotate, shared)
    else:
        row = rotation_rows(task, weights=weights, rotate=rotate, smooth=smooth, smooth_search=smooth_search,
                            method=method, sensitivity=sensitivity, shared=shared, threads=threads, keep=keep,
                            exclude_regex=exclude_regex, evaluate=not no_eval, activations=activations,
                            rounding=rounding, calib_windows=calib_windows, head_weights=head_weights)
    text = json.dumps(row, default=_json_default)
    click.echo(text)
    if out:
        with open(out, "a") as f:
            f.write(text + "\n")


def _rotation_variant(attention: str | None, qk: bool | None, smoothrot: bool | None = None) -> None:
    """Experiments only: build the pass with other attention/q-k settings than its defaults
    (compile() builds passes from CompileOptions, which has just `rotate`)."""
    from edgeq.passes.hadamard_rotation import HadamardRotation

    changes = {k: v for k, v in (("attention", attention), ("qk", qk)) if v is not None}
    if smoothrot is False:
        changes["smooth_grid"] = ()
    _patch_from_options(HadamardRotation, changes, "")


def _gptq_variant(settings: tuple[str, ...]) -> None:
    """Experiments only: GPTQ pass attributes that CompileOptions does not expose."""
    from edgeq.passes.gptq import GPTQ

    changes = {}
    for item in settings:
        name, _, text = item.partition("=")
        value = json.loads(text)
        changes[name] = tuple(value) if isinstance(value, list) else value
    _patch_from_options(GPTQ, changes, "gptq.")


def _patch_from_options(cls, changes: dict, label: str) -> None:
    """Make `cls.from_options` set `changes` on the pass it builds; record them in _VARIANT."""
    if not changes:
        return
    original = cls.from_options.__func__

    def from_options(klass, options, target):
        built = original(klass, options, target)
        for key, value in changes.items():
            if not hasattr(built, key):
                raise click.BadParameter(f"{cls.__name__} has no setting {key!r}")
            setattr(built, key, value)
        return built

    cls.from_options = classmethod(from_options)
    _VARIANT.update({f"{label}{k}": v for k, v in changes.items()})


_VARIANT: dict = {}


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return str(obj)


if __name__ == "__main__":
    main()
