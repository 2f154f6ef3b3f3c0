"""The compile report: what was done, what it costs, how far the output is from float."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeq.errors import OptionError
from edgeq.ir.files import write_text_atomic
from edgeq.pipeline import PassRecord
from edgeq.runtime.fusion import FusionReport
from edgeq.runtime.verification import Verification
from edgeq.targets.base import Target


@dataclass(frozen=True)
class PassRow:
    """One pass in the report: what it changed and how long it took (pipelines are not rows)."""

    name: str
    modified: bool
    stats: dict[str, int | float]
    seconds: float


def pass_rows(records: list[PassRecord], seconds: list[tuple[str, float]]) -> list[PassRow]:
    """Join the context's records with a TimingInstrument's times (both in completion order)."""
    if [r.name for r in records] != [name for name, _ in seconds]:
        raise ValueError("pass records and timings disagree: the timing instrument saw other passes")
    return [PassRow(r.name, r.modified, dict(r.stats), s) for r, (_, s) in zip(records, seconds) if not r.pipeline]


REPORT_SUFFIXES = {".json": "json", ".md": "markdown", ".markdown": "markdown"}


def report_format(path: str | os.PathLike) -> str:
    """"json" or "markdown" from a report path's suffix; any other suffix is a user error."""
    suffix = Path(path).suffix.lower()
    if suffix not in REPORT_SUFFIXES:
        raise OptionError(f"--report {path}: unknown report format {suffix or '(no suffix)'!r}",
                          fix="name the report FILE.json or FILE.md")
    return REPORT_SUFFIXES[suffix]


@dataclass
class Report:
    model: str
    target: str
    scheme: str
    options: dict[str, Any]          # the options given (those that differ from the defaults)
    provider: str = "cpu"           # the target's execution the output was compiled for and checked on
    output: str | None = None        # where the model was written (set by Compiled.save)
    date: str = ""                   # when the compile started (UTC)
    versions: dict[str, str] = field(default_factory=dict)     # edgeq, onnx, onnxruntime, the provider
    calibration: dict[str, Any] | None = None                   # source, counts, held-out samples named
    settings: dict[str, str] = field(default_factory=dict)      # what each choice came to, in words
    total_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # load, calibration data, pipeline, ...
    passes: list[PassRow] = field(default_factory=list)
    quantized_ops: dict[str, int] = field(default_factory=dict)
    kept_high: dict[str, list[str]] = field(default_factory=dict)     # reason -> op names
    weight_widths: dict[str, list[str]] = field(default_factory=dict)  # --size-budget: width -> op names
    roles: dict[str, int] = field(default_factory=dict)
    float_bytes: int = 0
    compiled_bytes: int = 0
    verification: Verification | None = None
    fusion: FusionReport | None = None
    sensitivity: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def size_ratio(self) -> float:
        return self.compiled_bytes / self.float_bytes if self.float_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["size_ratio"] = self.size_ratio
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_jsonable)

    def summary_lines(self) -> list[str]:
        lines = [f"target {self.target} ({self.scheme}) on {self.provider}: {sum(self.quantized_ops.values())} ops "
                 f"quantized ({', '.join(f'{k} {v}' for k, v in sorted(self.quantized_ops.items()))})"]
        if self.float_bytes:
            lines.append(f"size: {self.float_bytes / 1e6:.1f} MB -> {self.compiled_bytes / 1e6:.1f} MB "
                         f"({100 * self.size_ratio:.1f}% of float)")
        rotation = self.settings.get("Hadamard rotation", "off")
        if not rotation.startswith("off"):
            lines.append(f"rotation: {rotation}")
        if self.verification is not None:
            what = ("synthetic sample(s) (random inputs, no calibration data held out)"
                    if self.verification.synthetic_inputs else "held-out sample(s)")
            if self.verification.ran_on:
                what += f" on {self.verification.ran_on}"
            for out in self.verification.outputs:
                lines.append(f"error vs float on {self.verification.samples} {what}: "
                             f"{out.name}: rel L2 {out.relative_l2:.4f}, cosine mean {out.cosine_mean:.5f} "
                             f"min {out.cosine_min:.5f}, SQNR {out.sqnr_db:.1f} dB, max abs {out.max_abs:.4g}")
        if self.fusion is not None:
            lines.extend(placement_lines(self.fusion))
        for reason, names in sorted(self.kept_high.items()):
            lines.append(f"kept high: {len(names)} op(s), {reason}")
        for item in self.sensitivity[:5]:
            lines.append(f"sensitive: {item['op']} (SQNR {item['sqnr_db']:.1f} dB, end-to-end gain if high "
                         f"{item.get('gain', float('nan')):.4f})")
        lines.extend(f"note: {n}" for n in self.notes)
        return lines

    def to_markdown(self) -> str:
        out = [f"# edgeq compile report: {Path(self.model).name} -> {self.target}", "",
               f"Scheme **{self.scheme}** on {self.provider}.", "", "## Summary", ""]
        out += [f"- {line}" for line in self.summary_lines()]
        out += ["", "## Run", ""] + [f"- {k}: {v}" for k, v in self.run_lines()]
        if self.calibration:
            out += ["", "## Calibration data", ""] + [f"- {line}" for line in calibration_lines(self.calibration)]
        out += ["", "## Options", "", "| setting | value |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in self.settings.items()]
        given = ", ".join(f"{k}={_option_text(v)}" for k, v in self.options.items()) or "none (all defaults)"
        out += ["", f"Options given: {given}."]
        out += ["", "## Passes", "", "| pass | changed | seconds | stats |", "|---|---|---|---|"]
        for rec in self.passes:
            stats = ", ".join(f"{k}={v}" for k, v in rec.stats.items())
            out.append(f"| {rec.name} | {'yes' if rec.modified else 'no'} | {rec.seconds:.2f} | {stats} |")
        if self.verification is not None:
            held = (self.calibration or {}).get("held_out") or []
            what = (f"{self.verification.samples} synthetic sample(s) (random inputs: no calibration data was held out)"
                    if self.verification.synthetic_inputs else
                    f"{self.verification.samples} held-out sample(s)" + (f": {', '.join(held)}" if held else ""))
            where = f", the compiled model on {self.verification.ran_on}" if self.verification.ran_on else ""
            out += ["", "## Verification against float (ONNX Runtime)", "", f"On {what}{where}.", "",
                    "| output | rel L2 | cosine mean | cosine min | SQNR dB | max abs |", "|---|---|---|---|---|---|"]
            for o in self.verification.outputs:
                out.append(f"| {o.name} | {o.relative_l2:.5f} | {o.cosine_mean:.6f} | {o.cosine_min:.6f} | "
                           f"{o.sqnr_db:.2f} | {o.max_abs:.4g} |")
        if self.fusion is not None and self.fusion.unfused:
            out += ["", "## Quantized ops without an integer kernel", "",
                    f"{len(self.fusion.unfused)} op(s): " + ", ".join(self.fusion.unfused)]
        if self.sensitivity:
            out += ["", "## Sensitivity (worst first)", "", "| op | SQNR dB | end-to-end gain if kept high |",
                    "|---|---|---|"]
            for item in self.sensitivity:
                out.append(f"| {item['op']} | {item['sqnr_db']:.2f} | {item.get('gain', float('nan')):.5f} |")
        if self.kept_high:
            out += ["", "## Kept in high precision", ""]
            for reason, names in sorted(self.kept_high.items()):
                out.append(f"- {reason} ({len(names)}): {', '.join(names)}")
        return "\n".join(out) + "\n"

    def run_lines(self) -> list[tuple[str, str]]:
        """The run's facts: output, date, versions, total and per-stage time."""
        lines = [("model", self.model), ("output", self.output or "(not written)")]
        if self.date:
            lines.append(("date", self.date))
        if self.versions:
            lines.append(("versions", ", ".join(f"{k} {v}" for k, v in self.versions.items())))
        if self.total_seconds:
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_seconds.items())
            lines.append(("time", f"{self.total_seconds:.1f} s" + (f" ({stages})" if stages else "")))
        return lines

    def write(self, path: str | os.PathLike) -> None:
        """The report as JSON or Markdown by the suffix (.json, .md); the file gets the usual mode
        for new files, like the model (edgeq.ir.files.atomic_write)."""
        path = Path(path)
        text = self.to_markdown() if report_format(path) == "markdown" else self.to_json()
        write_text_atomic(path, text)


def calibration_lines(record: dict[str, Any]) -> list[str]:
    """The calibration data in words: source, how it was cut, counts, the held-out samples."""
    lines = [f"source: {record.get('source')} ({record.get('kind')})"]
    if "tokenizer" in record:
        lines.append(f"tokenizer: {record['tokenizer']}")
    if "seq_len" in record:
        first = record.get("first_window", 0)
        lines.append(f"windows of {record['seq_len']} tokens: {first}..{first + record.get('windows', 0) - 1}")
    held = record.get("held_out") or []
    lines.append(f"calibration samples: {record.get('calibration_samples', 0)}; held out for verification: "
                 f"{len(held)}" + (f" ({', '.join(held)})" if held else ""))
    return lines


def _option_text(value: Any) -> str:
    return json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)


def runtime_versions(execution=None) -> dict[str, str]:
    """Versions of what compiled and checked the model: edgeq, onnx, ONNX Runtime, and the
    execution provider (a plugin's package version where it is one)."""
    from importlib import metadata

    import onnx
    import onnxruntime

    from edgeq.version import __version__

    versions = {"edgeq": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    if execution is not None:
        provider = execution.provider
        plugin = getattr(execution, "plugin", None)
        if plugin is not None:
            try:
                provider += f" ({plugin.package} {metadata.version(plugin.package)})"
            except metadata.PackageNotFoundError:
                provider += f" ({plugin.package}, not installed)"
        versions["provider"] = provider
    return versions


def placement_lines(placement: FusionReport) -> list[str]:
    """The placement check in the summary: provider, node assignment, integer kernels, leftovers."""
    where = placement.provider + ("" if placement.via == "onnxruntime" else f" (via the {placement.via})")
    nodes = ", ".join(f"{k} {v}" for k, v in placement.nodes_by_provider.items())
    lines = [f"placement: {where}" + (f"; nodes: {nodes}" if nodes else "")]
    kernels = ", ".join(f"{k} {v}" for k, v in placement.integer_kernels.items()) or "none"
    lines.append(f"integer kernels ({placement.check}): {kernels}")
    if placement.float_layers:
        lines.append("float compute layers: " + ", ".join(f"{k} {v}" for k, v in placement.float_layers.items()))
    if placement.unfused:
        shown = ", ".join(placement.unfused[:8]) + (" (all of them in the report)" if len(placement.unfused) > 8 else "")
        lines.append(f"UNFUSED quantized ops ({len(placement.unfused)}): {shown}")
    else:
        lines.append("every quantized compute op fused into an integer kernel")
    return lines


def _jsonable(obj):
    if hasattr(obj, "__dict__"):
        return obj.__dict__
    if isinstance(obj, float):
        return str(obj)
    return str(obj)


def _execution_text(execution) -> str:
    how = f"plugin {execution.plugin.package}, edgeq[{execution.plugin.extra}]" if execution.plugin else "built in"
    text = f"{execution.name} = {execution.provider} ({how}; kept-high ops in {execution.high_precision}"
    return text + (", own QDQ layout)" if execution.ops is not None else ")")


def kept_high_by_reason(kept: list[tuple[Any, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for op, reason in kept:
        grouped.setdefault(reason, []).append(op.name)
    return grouped


def count_kinds(ops) -> dict[str, int]:
    return dict(Counter(op.op_type for op in ops))


def describe_target(target: Target) -> dict[str, Any]:
    lines = [f"{target.name}: {target.description}", "",
             f"activations (default): {target.activation.describe()}",
             f"weights (default):     {target.weight.describe()}"]
    lines += [f"weights {dtype + ':':<15}{spec.describe()}" for dtype, spec in sorted(target.weight_specs.items())]
    lines += [f"activation dtypes:     {', '.join(sorted(target.activation_dtypes))}",
              f"kept high:             {', '.join(sorted(target.keep_high)) or '-'}",
              f"opset:                 {target.opset}",
              "runs on (preferred first): " + "; ".join(_execution_text(e) for e in target.executions),
              "", "integer ops:"]
    for kind, rule in sorted(target.ops.items()):
        acts = ", ".join(s.describe() if s else "float" for s in rule.activations) or "-"
        weight = rule.weight.describe() if rule.weight else "-"
        lines.append(f"  {kind:<10} activations [{acts}]  weight [{weight}]"
                     + (f"  bias [{rule.bias.describe()}]" if rule.bias else ""))
    lines += ["", "pipeline: " + " -> ".join(target.default_pipeline)]
    if target.cost_model is not None:
        model = target.cost_model
        lines.append(f"cost model: {model.unit}" + ("; needs a device (--device)" if model.needs_device else "")
                     + f"; source: {model.source}")
    lines += [f"note: {n}" for n in target.notes]
    return {"name": target.name, "text": "\n".join(lines),
            "ops": {k: asdict(v) for k, v in target.ops.items()}, "keep_high": sorted(target.keep_high),
            "weight_specs": {target.weight.dtype: asdict(target.weight),
                             **{k: asdict(v) for k, v in target.weight_specs.items()}},
            "pipeline": list(target.default_pipeline)}
