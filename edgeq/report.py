"""The compile report: what was done, what it costs, how far the output is from float."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass
class Report:
    model: str
    target: str
    scheme: str
    options: dict[str, Any]
    provider: str = "cpu"           # the target's execution the output was compiled for and checked on
    passes: list[PassRow] = field(default_factory=list)
    quantized_ops: dict[str, int] = field(default_factory=dict)
    kept_high: dict[str, list[str]] = field(default_factory=dict)     # reason -> op names
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
        if self.verification is not None:
            for out in self.verification.outputs:
                lines.append(f"error vs float on {self.verification.samples} held-out sample(s)"
                             f"{' (synthetic inputs)' if self.verification.synthetic_inputs else ''}: "
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
               f"Scheme **{self.scheme}**. Options: `{json.dumps(self.options, default=_jsonable)}`", "",
               "## Summary", ""] + [f"- {line}" for line in self.summary_lines()]
        out += ["", "## Passes", "", "| pass | changed | seconds | stats |", "|---|---|---|---|"]
        for rec in self.passes:
            stats = ", ".join(f"{k}={v}" for k, v in rec.stats.items())
            out.append(f"| {rec.name} | {'yes' if rec.modified else 'no'} | {rec.seconds:.2f} | {stats} |")
        if self.verification is not None:
            out += ["", "## Verification against float (ONNX Runtime)", "",
                    "| output | rel L2 | cosine mean | cosine min | SQNR dB | max abs |", "|---|---|---|---|---|---|"]
            for o in self.verification.outputs:
                out.append(f"| {o.name} | {o.relative_l2:.5f} | {o.cosine_mean:.6f} | {o.cosine_min:.6f} | "
                           f"{o.sqnr_db:.2f} | {o.max_abs:.4g} |")
        if self.sensitivity:
            out += ["", "## Sensitivity (worst first)", "", "| op | SQNR dB | end-to-end gain if kept high |",
                    "|---|---|---|"]
            for item in self.sensitivity:
                out.append(f"| {item['op']} | {item['sqnr_db']:.2f} | {item.get('gain', float('nan')):.5f} |")
        if self.kept_high:
            out += ["", "## Kept in high precision", ""]
            for reason, names in sorted(self.kept_high.items()):
                out.append(f"- {reason}: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
        return "\n".join(out) + "\n"

    def write(self, path: str | os.PathLike) -> None:
        path = Path(path)
        text = self.to_markdown() if path.suffix.lower() in (".md", ".markdown") else self.to_json()
        write_text_atomic(path, text)


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
        shown = ", ".join(placement.unfused[:8]) + (" ..." if len(placement.unfused) > 8 else "")
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
