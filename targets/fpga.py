"""The FPGA target: an integer-only datapath from the first QuantizeLinear to the last
DequantizeLinear, whose ONNX Runtime execution is the bit-exact functional model of the design.

- activations int8, symmetric, one power-of-two scale per tensor; softmax probabilities are
  uint8 with scale 1/256 (the integer softmax's output, not a Q/DQ);
- weights int8 (or narrower: int4, int2 values stored in int8 for MatMulInteger), symmetric,
  per output channel or per tensor, power-of-two scales;
- requantization is shift-only (scales are powers of two, so every ratio is a shift);
- softmax, LayerNorm and GELU run as integer kernels (edgeq.integer: I-BERT i-exp/i-erf, exact
  isqrt); the embedding lookup before the first norm runs on the host and is listed in the
  model's `edgeq.host_ops` metadata;
- resources and latency come from edgeq.fpga (dataflow / overlay templates) on a named device.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx

from edgeq.errors import CostModelError
from edgeq.registry import register_target
from edgeq.targets.base import CostModel, Granularity, OpRule, QSpec, Target

ACTIVATION = QSpec("int8", symmetric=True, scale_pow2=True)
WEIGHT = QSpec("int8", symmetric=True, granularity=Granularity.CHANNEL, axis=-1, scale_pow2=True)
INPUT_SHAPES_KEY = "edgeq.fpga.input_shapes"

_PREPROCESS = ("identity-elimination", "constant-folding", "dead-code-elimination", "shape-inference")
_PIPELINE = _PREPROCESS + ("select-precision", "calibrate", "lower-to-integer", "dead-code-elimination",
                           "topological-sort")


@dataclass(frozen=True)
class FpgaCostModel(CostModel):
    """Resources and latency of a compiled model on a device, from edgeq.fpga's templates.

    It prices layers (matrix-vector units, attention products, nonlinear units), not work
    counts, and needs a device: `estimate(model, device)`; `cost(counts)` refuses."""

    needs_device: bool = True

    def cost(self, counts: Mapping[str, float]) -> dict[str, float]:
        raise CostModelError("the fpga cost model prices a compiled model on a device, not work counts",
                             fix="use `edgeq estimate MODEL --target fpga --device D`")

    def estimate(self, model: str | Path | onnx.ModelProto, device: str, *, fps: float | None = None,
                 folding: str | Path | None = None, input_shapes: Mapping[str, Sequence[int]] | None = None,
                 **options: Any):
        """An `edgeq.fpga.EstimateReport` of `model` on `device`. Symbolic input dims take the
        shapes given, else those a compile recorded from its calibration samples."""
        from edgeq.fpga import estimate_onnx

        if not isinstance(model, onnx.ModelProto):
            model = onnx.load(str(model), load_external_data=True)
        note = None
        if not input_shapes:
            recorded = {p.key: p.value for p in model.metadata_props}.get(INPUT_SHAPES_KEY)
            symbolic = [i.name for i in model.graph.input
                        if any(not d.HasField("dim_value") for d in i.type.tensor_type.shape.dim)]
            if recorded and symbolic:
                input_shapes = {k: v for k, v in json.loads(recorded).items() if k in symbolic}
                note = ("input shapes " + ", ".join(f"{k}={v}" for k, v in input_shapes.items())
                        + ": those of the calibration samples, recorded at compile time")
        elif input_shapes:
            note = "input shapes " + ", ".join(f"{k}={list(v)}" for k, v in input_shapes.items()) + ": given"
        report = estimate_onnx(model, device, input_shapes=input_shapes or None, fps=fps, folding=folding,
                               **options)
        return replace(report, assumptions=(note, *report.assumptions)) if note else report


FPGA = register_target(Target(
    name="fpga",
    description="FPGA integer datapath: int8 symmetric power-of-two scales, shift-only requantization, "
                "integer softmax/LayerNorm/GELU; embedding on the host",
    ops={"MatMul": OpRule(activations=(ACTIVATION, ACTIVATION), weight=WEIGHT, weight_slots=(1,))},
    activation=ACTIVATION,
    weight=WEIGHT,
    weight_dtypes=frozenset({"int8", "int4", "int2"}),
    activation_dtypes=frozenset({"int8"}),
    keep_high=frozenset(),
    high_dtype="float32",
    default_pipeline=_PIPELINE,
    integer_only=True,
    cost_model=FpgaCostModel(
        unit="LUT/FF/BRAM18/URAM/DSP and cycles on a named device",
        prices={},
        source="edgeq.fpga: dataflow template (FINN MVAU formulas) or overlay template; device catalog "
               "edgeq.targets.fpga_devices"),
    notes=("integer-only between the first QuantizeLinear and the last DequantizeLinear; host ops (embedding "
           "lookup) are listed in the model metadata 'edgeq.host_ops'",
           "ONNX Runtime's execution is bit-identical to the numpy reference of the datapath "
           "(edgeq.integer.program, stored in the model metadata 'edgeq.integer.program')"),
))
