"""The FPGA target: an integer-only datapath from the first QuantizeLinear to the last
DequantizeLinear, whose ONNX Runtime execution is the bit-exact functional model of the design.

- activations int8, symmetric, one power-of-two scale per tensor; wider integers only where the
  datapath naturally has them: int32 accumulators, an int16 residual stream (LayerNorm outputs)
  and int32 LayerNorm/GELU inputs, uint16 softmax probabilities (scale 2^-16) multiplied with V as
  two 8-bit digits; a linear layer's wide input passes an online integer Walsh-Hadamard
  transform (adds/subtracts, rotation folded into the weights) before its int8 requantization,
  so every multiplier input is 8 bits wide with one scale; the embedding sum enters rotated
  (tables stored pre-rotated on the host) and is rotated back by the first integer step;
- weights int8 (or narrower: int4, int2 values stored in int8 for MatMulInteger), symmetric,
  per output channel or per tensor, power-of-two scales;
- requantization is shift-only (scales are powers of two, so every ratio is a shift);
- softmax, LayerNorm and GELU run as integer kernels (edgeq.backends.fpga.integer: I-BERT i-exp/i-erf, exact
  isqrt); the embedding lookup before the first norm runs on the host and is listed in the
  model's `edgeq.host_ops` metadata;
- resources and latency come from edgeq.backends.fpga (dataflow / overlay templates) on a named device.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx

from edgeq.errors import CostModelError
from edgeq.backends.fpga.integer.program import METADATA_KEY as PROGRAM_KEY
from edgeq.registry import register_target
from edgeq.targets.base import CostModel, Granularity, OpRule, QSpec, Target

ACTIVATION = QSpec("int8", symmetric=True, scale_pow2=True)
WEIGHT = QSpec("int8", symmetric=True, granularity=Granularity.CHANNEL, axis=-1, scale_pow2=True)
INTEGER_DATAPATH_NOTE = (
    "integer datapath (edgeq lower-to-integer): each integer matmul's requantization is a shift (round, "
    "saturate), priced as part of the matmul engine with no threshold stage; softmax, GELU and LayerNorm run "
    "as I-BERT-style integer kernels (i-exp, i-erf polynomial, exact isqrt) but are priced with "
    "edgeq.backends.fpga.nonlinear's unit prices (table-based exp/GELU, 8-bit lanes), not gate by gate; the online "
    "Walsh-Hadamard transforms as adder-only units; the int16 residual stream is priced as 8-bit lanes; "
    "host ops (embedding lookup) are not priced")

_PREPROCESS = ("convert-opset", "identity-elimination", "constant-folding", "dead-code-elimination", "shape-inference")
# No `calibrate` pass: lower-to-integer calibrates every tensor it quantizes itself, in one run,
# with the per-channel statistics its channel scales need (the calibrate pass keeps none).
_PIPELINE = _PREPROCESS + ("select-precision", "lower-to-integer", "dead-code-elimination", "topological-sort")


@dataclass(frozen=True)
class FpgaCostModel(CostModel):
    """Resources and latency of a compiled model on a device, from edgeq.backends.fpga's templates.

    It prices layers (matrix-vector units, attention products, nonlinear units), not work
    counts, and needs a device: `estimate(model, device)`; `cost(counts)` refuses."""

    needs_device: bool = True

    def cost(self, counts: Mapping[str, float]) -> dict[str, float]:
        raise CostModelError("the fpga cost model prices a compiled model on a device, not work counts",
                             fix="use `edgeq estimate MODEL --target fpga --device D`")

    def device(self, name: str):
        """The catalog device `name` (a part key or board alias); unknown names raise."""
        from edgeq.backends.fpga.devices import get_device

        return get_device(name)

    def estimate(self, model: str | Path | onnx.ModelProto, device: str, *, fps: float | None = None,
                 folding: str | Path | None = None, input_shapes: Mapping[str, Sequence[int]] | None = None,
                 **options: Any):
        """An `edgeq.backends.fpga.EstimateReport` of `model` on `device`. Symbolic input dims take the
        shapes given, else those a compile recorded from its calibration samples."""
        from edgeq.backends.fpga import estimate_onnx
        from edgeq.backends.fpga.lower_to_integer import INPUT_SHAPES_KEY

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
        notes = [note] if note else []
        if any(p.key == PROGRAM_KEY for p in model.metadata_props):
            notes += [INTEGER_DATAPATH_NOTE]
        return replace(report, assumptions=(*notes, *report.assumptions)) if notes else report


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
        source="edgeq.backends.fpga: dataflow template (FINN MVAU formulas) or overlay template; device catalog "
               "edgeq.backends.fpga.devices"),
    notes=("integer-only between the first QuantizeLinear and the last DequantizeLinear; host ops (embedding "
           "lookup) are listed in the model metadata 'edgeq.host_ops'",
           "softmax, LayerNorm, GELU and residual adds run as integer kernels (edgeq.backends.fpga.integer, emitted by the "
           "lower-to-integer pass), not as Q/DQ rules; MatMul is the only op kind above",
           "activation scales: one power of two per tensor (every MatMulInteger input 8-bit); LayerNorm outputs "
           "(residual stream) int16; a linear layer's wide input (LayerNorm or GELU output, P.V product) passes an "
           "online integer Walsh-Hadamard transform before the int8 shift (rotation folded into the weights); the "
           "embedding tables are stored rotated and the datapath's first step rotates back; the earlier per-channel "
           "power-of-two factors are an explicit Python option, LowerToInteger(equalization=1.0, rotate=False, "
           "residual_bits=8), outside this rule: validate reports its channel-scaled edges (for comparison only)",
           "ONNX Runtime's execution is bit-identical to the numpy reference of the datapath "
           "(edgeq.backends.fpga.integer.program, stored in the model metadata 'edgeq.integer.program')"),
))
