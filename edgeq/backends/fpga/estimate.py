"""`estimate`: choose a template (dataflow if it fits the device, else overlay) and report.

The cost model prices target-independent layer descriptions (edgeq.backends.fpga.layers) against a
device from the catalog (edgeq.backends.fpga.devices). Every report names its template and lists
the assumptions that produced it; an op without a price raises CostModelError.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import onnx

from edgeq.errors import OptionError
from edgeq.backends.fpga.dataflow import (
    LayerFolding,
    dataflow_estimate,
    folding_from_json,
    minimal_folding,
    search_folding,
)
from edgeq.backends.fpga.layers import Layer, layers_from_onnx
from edgeq.backends.fpga.overlay import OverlayConfig, default_overlay, overlay_estimate
from edgeq.backends.fpga.primitives import Resources
from edgeq.backends.fpga.report import EstimateReport, TemplateResult
from edgeq.backends.fpga.devices import (
    FINN_UTILISATION_LIMITS,
    FpgaDevice,
    UtilisationLimits,
    get_device,
)

Template = Literal["auto", "dataflow", "overlay"]
TEMPLATES = ("auto", "dataflow", "overlay")
FoldingSource = Mapping[str, LayerFolding] | Mapping[str, Any] | str | Path


def _available(device: FpgaDevice) -> Resources:
    return Resources(**device.resource_counts())


def _grouped_sources(device: FpgaDevice) -> str:
    """Field sources with identical text merged: 'lut, ff: <source>; bram18: <source>'."""
    groups: dict[str, list[str]] = {}
    for name, source in device.sources().items():
        groups.setdefault(source, []).append(name)
    return "; ".join(f"{', '.join(names)}: {source}" for source, names in groups.items())


def _report(result: TemplateResult, device: FpgaDevice, clock_mhz: float,
            limits: UtilisationLimits, extra: list[str]) -> EstimateReport:
    device_line = (f"device {device.board} ({device.part}), {device.dsp_slice}; sources: "
                   + _grouped_sources(device))
    limits_line = (f"utilisation limits LUT {limits.lut:.0%}, FF {limits.ff:.0%}, BRAM18 "
                   f"{limits.bram18:.0%}, URAM {limits.uram:.0%}, DSP {limits.dsp:.0%} "
                   f"({limits.source})")
    return EstimateReport(
        template=result.template,
        device=device.key,
        board=device.board,
        clock_mhz=clock_mhz,
        rows=result.rows,
        units=result.units,
        totals=result.totals,
        available=_available(device),
        limits=limits,
        latency_cycles=result.latency_cycles,
        interval_cycles=result.interval_cycles,
        assumptions=(*extra, *result.assumptions, limits_line, device_line),
    )


def _is_folding_map(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(v, LayerFolding) for v in value.values())


def _dataflow_folding(layers: Sequence[Layer], folding: FoldingSource | None, fps: float | None,
                      clock_mhz: float) -> tuple[Mapping[str, LayerFolding], list[str]]:
    if folding is not None and fps is not None:
        raise OptionError("give either a folding or a target fps, not both")
    if folding is not None:
        chosen = folding if _is_folding_map(folding) else folding_from_json(folding)
        where = folding if isinstance(folding, (str, Path)) else "the caller"
        return chosen, [f"folding read from {where}"]
    if fps is not None:
        chosen, notes = search_folding(layers, fps, clock_mhz)
        return chosen, [f"folding searched: cheapest legal PE/SIMD per layer meeting {fps:g} fps "
                        f"at {clock_mhz:g} MHz (fewest lanes, SIMD before PE)", *notes]
    return minimal_folding(layers), ["folding: PE = SIMD = 1 for every layer (no fps or "
                                     "folding given: smallest engines)"]


def _clock(device: FpgaDevice, clock_mhz: float | None) -> float:
    if clock_mhz is not None:
        if clock_mhz <= 0:
            raise OptionError(f"clock must be positive, got {clock_mhz} MHz")
        return clock_mhz
    return device.clock_mhz.require("reference clock", device.key)


def estimate(layers: Sequence[Layer], device: str | FpgaDevice, *,
             template: Template = "auto", fps: float | None = None,
             folding: FoldingSource | None = None, overlay: OverlayConfig | None = None,
             clock_mhz: float | None = None, dram_gbps: float | None = None,
             limits: UtilisationLimits = FINN_UTILISATION_LIMITS) -> EstimateReport:
    """Estimate resources and latency of `layers` on `device`.

    template="auto" prices the dataflow template (folding from `folding`, searched for `fps`,
    or minimal) and keeps it if it fits within `limits`; otherwise it prices the overlay
    (`overlay`, or an array sized to the device). `clock_mhz` defaults to the device's reference
    clock (an overlay config carries its own clock).
    """
    if template not in TEMPLATES:
        raise OptionError(f"unknown template '{template}'", fix=f"use one of {TEMPLATES}")
    dev = get_device(device)
    if template == "overlay" and folding is not None:
        raise OptionError("a folding applies to the dataflow template, not the overlay")
    if overlay is not None and clock_mhz is not None and clock_mhz != overlay.clock_mhz:
        raise OptionError(f"clock {clock_mhz} MHz conflicts with the overlay's "
                          f"{overlay.clock_mhz} MHz", fix="set the clock in OverlayConfig")
    notes: list[str] = []
    if template in ("auto", "dataflow"):
        clock = _clock(dev, clock_mhz)
        chosen, fold_notes = _dataflow_folding(layers, folding, fps, clock)
        result = dataflow_estimate(layers, chosen)
        report = _report(result, dev, clock, limits, fold_notes)
        if template == "dataflow":
            return report
        if report.fits:
            return _report(result, dev, clock, limits,
                           ["auto: the dataflow template fits the device within the limits",
                            *fold_notes])
        util = report.utilisation
        notes.append("auto: the dataflow template does not fit (" + ", ".join(
            f"{name} {util[name]:.0%}" for name in report.over_limit) + ") -> overlay")
    cfg = overlay or default_overlay(dev, layers, limits, _clock(dev, clock_mhz))
    if fps is not None:
        notes.append(f"target {fps:g} fps: the overlay runs one frame at a time; compare with "
                     "throughput_fps")
    return _report(overlay_estimate(layers, dev, cfg, dram_gbps), dev, cfg.clock_mhz, limits,
                   notes)


def estimate_onnx(model: onnx.ModelProto | str | Path, device: str | FpgaDevice, *,
                  input_shapes: Mapping[str, Sequence[int]] | None = None,
                  **options: Any) -> EstimateReport:
    """`estimate` of a quantized ONNX model (a path or a loaded ModelProto)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=True)
    return estimate(layers_from_onnx(model, input_shapes=input_shapes), device, **options)
