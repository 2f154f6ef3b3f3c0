"""The estimate report: per-layer rows, shared units, totals, fit, template and assumptions."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from edgeq.backends.fpga.primitives import RESOURCE_NAMES, Resources
from edgeq.backends.fpga.devices import UtilisationLimits


@dataclass(frozen=True)
class Row:
    """One layer (or one shared hardware unit): its resources, cycles and how they were priced."""

    name: str
    kind: str
    cycles: int
    resources: Resources | None  # None: the layer runs on shared units (overlay)
    detail: str


@dataclass(frozen=True)
class TemplateResult:
    """What a template computes before the device fit is checked."""

    template: str
    rows: tuple[Row, ...]
    units: tuple[Row, ...]
    totals: Resources
    latency_cycles: int
    interval_cycles: int
    assumptions: tuple[str, ...]


@dataclass(frozen=True)
class EstimateReport:
    """A resource and latency estimate of one model on one device with one template."""

    template: str
    device: str
    board: str
    clock_mhz: float
    rows: tuple[Row, ...]
    units: tuple[Row, ...]
    totals: Resources
    available: Resources
    limits: UtilisationLimits
    latency_cycles: int
    interval_cycles: int
    assumptions: tuple[str, ...]

    @property
    def latency_ms(self) -> float:
        return self.latency_cycles / (self.clock_mhz * 1e3)

    @property
    def throughput_fps(self) -> float:
        return self.clock_mhz * 1e6 / self.interval_cycles if self.interval_cycles else math.inf

    @property
    def utilisation(self) -> dict[str, float]:
        used, avail = self.totals.as_dict(), self.available.as_dict()
        return {name: _fraction(used[name], avail[name]) for name in RESOURCE_NAMES}

    @property
    def over_limit(self) -> tuple[str, ...]:
        limit = {name: getattr(self.limits, name) for name in RESOURCE_NAMES}
        return tuple(name for name, frac in self.utilisation.items() if frac > limit[name])

    @property
    def fits(self) -> bool:
        return not self.over_limit

    def to_dict(self) -> dict[str, Any]:
        return {
            "template": self.template,
            "device": self.device,
            "board": self.board,
            "clock_mhz": self.clock_mhz,
            "latency_cycles": self.latency_cycles,
            "latency_ms": self.latency_ms,
            "interval_cycles": self.interval_cycles,
            "throughput_fps": self.throughput_fps,
            "totals": self.totals.as_dict(),
            "available": self.available.as_dict(),
            "utilisation": {k: (v if math.isfinite(v) else None)
                            for k, v in self.utilisation.items()},
            "limits": {name: getattr(self.limits, name) for name in RESOURCE_NAMES},
            "limits_source": self.limits.source,
            "fits": self.fits,
            "over_limit": list(self.over_limit),
            "layers": [_row_dict(r) for r in self.rows],
            "shared_units": [_row_dict(r) for r in self.units],
            "assumptions": list(self.assumptions),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        """GitHub-flavoured markdown: header, layer table, units table, totals, assumptions."""
        lines = [f"## FPGA estimate: {self.template} template on {self.board} ({self.device})", ""]
        lines += [f"- clock {self.clock_mhz:g} MHz; latency {self.latency_cycles} cycles = "
                  f"{self.latency_ms:.4g} ms; throughput {self.throughput_fps:.4g} fps",
                  "- fits: " + ("yes" if self.fits
                                else "no, over limit: " + ", ".join(self.over_limit)),
                  ""]
        lines += _markdown_table(self.rows)
        if self.units:
            lines += ["", "Shared units:", ""] + _markdown_table(self.units)
        lines += ["", "| | " + " | ".join(RESOURCE_NAMES) + " |",
                  "|---|" + "---|" * len(RESOURCE_NAMES)]
        for label, res in (("total", self.totals), ("available", self.available)):
            lines.append(f"| {label} | " + " | ".join(_num(v) for v in res.as_dict().values())
                         + " |")
        util = self.utilisation
        lines.append("| utilisation | " + " | ".join(f"{util[n]:.1%}" for n in RESOURCE_NAMES)
                     + " |")
        lines += ["", "Assumptions:", ""] + [f"- {a}" for a in self.assumptions]
        return "\n".join(lines)

    def to_text(self, max_layers: int | None = None) -> str:
        """A plain fixed-width table (no markup), for terminals and logs.

        `max_layers` shows only the first layer rows (the totals still cover every layer).
        """
        header = ["layer", "kind", "cycles", *RESOURCE_NAMES, "detail"]
        shown = self.rows if max_layers is None else self.rows[:max_layers]
        body = [_text_cells(r) for r in shown]
        if len(shown) < len(self.rows):
            hidden = self.rows[len(shown):]
            body.append([f"... {len(hidden)} more layers", "", str(sum(r.cycles for r in hidden))]
                        + [""] * len(RESOURCE_NAMES) + [""])
        body += [_text_cells(r) for r in self.units]
        body.append(["TOTAL", "", str(self.latency_cycles)]
                    + [_num(v) for v in self.totals.as_dict().values()] + [""])
        body.append(["AVAILABLE", "", ""]
                    + [_num(v) for v in self.available.as_dict().values()] + [""])
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header) - 1)]
        out = [f"{self.template} template, {self.board} ({self.device}) at {self.clock_mhz:g} MHz: "
               f"latency {self.latency_ms:.4g} ms, {self.throughput_fps:.4g} fps, "
               f"fits={self.fits}"]
        for row in [header, *body]:
            out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        out.append("assumptions:")
        out += [f"  - {a}" for a in self.assumptions]
        return "\n".join(out)


def _fraction(used: float, available: float) -> float:
    if available > 0:
        return used / available
    return 0.0 if used == 0 else math.inf


def _num(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _row_dict(row: Row) -> dict[str, Any]:
    res = row.resources.as_dict() if row.resources is not None else None
    return {"name": row.name, "kind": row.kind, "cycles": row.cycles, "resources": res,
            "detail": row.detail}


def _text_cells(row: Row) -> list[str]:
    res = ([_num(v) for v in row.resources.as_dict().values()] if row.resources is not None
           else ["shared"] + ["-"] * (len(RESOURCE_NAMES) - 1))
    return [row.name, row.kind, str(row.cycles), *res, row.detail]


def _markdown_table(rows: tuple[Row, ...]) -> list[str]:
    header = ["layer", "kind", "cycles", *RESOURCE_NAMES, "detail"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_text_cells(r)) + " |" for r in rows]
    return lines
