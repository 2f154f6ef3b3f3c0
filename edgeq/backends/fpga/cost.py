"""The fpga target's cost model: resources and latency of a compiled model on a named device.

It prices layers (matrix-vector units, attention products, nonlinear units) with this package's
templates (edgeq.backends.fpga.estimate), not work counts, so it needs a device. targets/fpga.py
declares an instance; the logic lives here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx

from edgeq.backends.fpga.devices import FpgaDevice, get_device
from edgeq.backends.fpga.estimate import (
    FINN_UTILISATION_LIMITS,
    estimate,
    estimate_onnx,
)
from edgeq.backends.fpga.layers import MatVecLayer, layers_from_onnx
from edgeq.backends.fpga.metadata import PROGRAM_KEY
from edgeq.backends.fpga.overlay import default_overlay
from edgeq.backends.fpga.report import EstimateReport
from edgeq.errors import CostModelError, OptionError
from edgeq.metadata import recorded_input_shapes
from edgeq.targets.base import CostModel, LinearLatencies

_WEIGHT_BITS = {"int2": 2, "int4": 4, "int8": 8}

# Said in every estimate of a model the lower-to-integer pass produced (its integer program is
# in the model metadata): how the integer datapath's steps map onto the templates' units.
INTEGER_DATAPATH_NOTE = (
    "integer datapath (edgeq lower-to-integer): each integer matmul's requantization is a shift (round, "
    "saturate), priced as part of the matmul engine with no threshold stage; softmax, GELU, SiLU, LayerNorm and "
    "RMSNorm run as I-BERT-style integer kernels (i-exp, i-erf polynomial, exact isqrt) but are priced with "
    "edgeq.backends.fpga.nonlinear's unit prices (table-based exp/GELU/sigmoid, 8-bit lanes), not gate by gate; the "
    "online Walsh-Hadamard transforms as adder-only units; the int16/int32 residual stream is priced as 8-bit lanes; "
    "host ops (embedding lookup, rotary cos/sin from positions) are not priced")


@dataclass(frozen=True)
class FpgaCostModel(CostModel):
    """Resources and latency of a compiled model on a device, from edgeq.backends.fpga's templates.

    It prices layers, not work counts, and needs a device: `estimate(model, device=D)`;
    `cost(counts)` refuses."""

    needs_device: bool = True

    def cost(self, counts: Mapping[str, float]) -> dict[str, float]:
        raise CostModelError("the fpga cost model prices a compiled model on a device, not work counts",
                             fix="use `edgeq estimate MODEL --target fpga --device D`")

    def device(self, name: str) -> FpgaDevice:
        """The catalog device `name` (a part key or board alias); unknown names raise."""
        return get_device(name)

    def linear_latencies(self, model: onnx.ModelProto, *, device: str | None,
                         dtypes: Sequence[str]) -> LinearLatencies:
        """Each matrix-vector layer of a compiled `model` priced at each weight dtype on the
        overlay array the estimate sizes for `device` (the same array for every dtype: the
        array's size does not depend on the weights' width, a layer's cycles do: a 4-bit lane
        takes an 8-bit weight in two products, and its weights stream in twice the bytes); the
        rest of the estimate (attention products, nonlinear units) as one latency. The overlay
        runs one layer after another, so a model's latency is the sum of its layers'; the
        dataflow template pipelines them (latency is not such a sum) and is refused."""
        if device is None:
            raise OptionError("--latency-budget prices the model on a device", fix="add --device D")
        shapes = recorded_input_shapes({p.key: p.value for p in model.metadata_props}) or None
        layers = layers_from_onnx(model, input_shapes=shapes)
        chosen = estimate(layers, device)
        if chosen.template != "overlay":
            raise CostModelError(f"this model fits {device} as the {chosen.template} template (a unit per layer, its "
                                 "folding sets its cycles): a weight's width changes its resources, not the latency",
                                 fix="--latency-budget chooses widths on the overlay template (a device the model "
                                     "does not fit as dataflow), else use --size-budget")
        dev = get_device(device)
        overlay = default_overlay(dev, layers, FINN_UTILISATION_LIMITS, dev.clock_mhz.require("reference clock", dev.key))
        hz = overlay.clock_mhz * 1e6
        matvecs = [layer.name for layer in layers if isinstance(layer, MatVecLayer)]  # graph order
        seconds: dict[str, dict[str, float]] = {name: {} for name in matvecs}
        as_compiled = {row.name: row.cycles / hz for row in chosen.rows if row.name in seconds}
        other = sum(row.cycles for row in chosen.rows if row.name not in seconds) / hz
        for dtype in dtypes:
            bits = _WEIGHT_BITS.get(dtype)
            if bits is None:
                raise OptionError(f"the fpga cost model prices int2/int4/int8 weights, not {dtype}")
            priced = [replace(layer, weight_bits=bits) if isinstance(layer, MatVecLayer) else layer
                      for layer in layers]
            report = estimate(priced, dev, template="overlay", overlay=overlay)
            for row in report.rows:
                if row.name in seconds:
                    seconds[row.name][dtype] = row.cycles / hz
        return LinearLatencies(seconds, as_compiled, float(other), dev.key,
                               f"overlay template, {overlay.source}, {overlay.clock_mhz:g} MHz")

    def estimate(self, model: str | os.PathLike | onnx.ModelProto, *,
                 input_shapes: Mapping[str, Sequence[int]] | None = None, device: str | None = None,
                 fps: float | None = None, folding: str | Path | None = None, **options: Any) -> EstimateReport:
        """An `edgeq.backends.fpga.EstimateReport` of `model` on `device`. Symbolic input dims take the
        shapes given, else those a compile recorded from its calibration samples."""
        if device is None:
            raise OptionError("the fpga cost model prices a model on a device", fix="add --device D")
        if not isinstance(model, onnx.ModelProto):
            model = onnx.load(str(model), load_external_data=True)
        note = None
        if not input_shapes:
            recorded = recorded_input_shapes({p.key: p.value for p in model.metadata_props})
            symbolic = [i.name for i in model.graph.input
                        if any(not d.HasField("dim_value") for d in i.type.tensor_type.shape.dim)]
            if recorded and symbolic:
                input_shapes = {k: v for k, v in recorded.items() if k in symbolic}
                note = ("input shapes " + ", ".join(f"{k}={v}" for k, v in input_shapes.items())
                        + ": recorded at compile time (--input-shape, else the first calibration sample)")
        elif input_shapes:
            note = "input shapes " + ", ".join(f"{k}={list(v)}" for k, v in input_shapes.items()) + ": given"
        report = estimate_onnx(model, device, input_shapes=input_shapes or None, fps=fps, folding=folding,
                               **options)
        notes = [note] if note else []
        if any(p.key == PROGRAM_KEY for p in model.metadata_props):
            notes += [INTEGER_DATAPATH_NOTE]
        return replace(report, assumptions=(*notes, *report.assumptions)) if notes else report
