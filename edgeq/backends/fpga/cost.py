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
from edgeq.backends.fpga.estimate import estimate_onnx
from edgeq.backends.fpga.metadata import PROGRAM_KEY
from edgeq.backends.fpga.report import EstimateReport
from edgeq.errors import CostModelError, OptionError
from edgeq.metadata import recorded_input_shapes
from edgeq.targets.base import CostModel

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
