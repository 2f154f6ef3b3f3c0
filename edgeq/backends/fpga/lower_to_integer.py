"""Lower a calibrated transformer encoder to an integer-only datapath (the `fpga` target).

Between the first QuantizeLinear and the final DequantizeLinear every op is integer:

- entry: the embedding lookup (Gather, adds, position ids) runs on the host in float; its sum
  is quantized to int8 with one power-of-two scale (`first_norm="integer"`, the default), or the
  host also runs the first LayerNorm and its output is quantized (`first_norm="host"`). With
  `rotate`, when the sum is a sum of table rows, the tables are stored multiplied by H_b / b (a
  weight change: the host still only looks rows up and adds them), the rotated sum is quantized
  and the datapath's first step multiplies by H_b again (integer adds, H_b H_b = b I), giving
  the int32 embedding sum the first LayerNorm reads;
- linear layers: MatMulInteger (int8 x int8 -> int32) with weights quantized symmetric, per
  output channel (or per tensor) with power-of-two scales (rounded to nearest, or with GPTQ),
  plus an int32 bias at the accumulator's scale s_x * s_w;
- activation scales: one power of two per tensor (the default, the fpga target's rule). Two
  integer devices keep the outlier channels of transformer activations from costing the other
  channels their int8 precision, neither of them a per-channel scale:
  * wide residual stream (`residual_bits=16`): LayerNorm outputs (the post-norm residual stream)
    are int16 with one power-of-two scale, as I-BERT keeps the residual/LayerNorm input wide; a
    linear layer reads them through the rotation below (or one shift to int8);
  * online Walsh-Hadamard rotation (`rotate=True`, QuaRot's idea): a linear layer's wide input
    with one scale (a LayerNorm output, a GELU output emitted as int16 for it, the P.V
    accumulator carried wide through its reshape, shifted to int16) goes through Sylvester's +-1
    transform on blocks of b channels (b the largest power of two dividing the width, <= 512),
    integer adds and subtracts only, then one shift to int8 with the calibrated range of the
    rotated float tensor; the orthogonal rotation and its 1/b fold into the layer's float weights
    before they are quantized (x W = (x H)(H^T W) / b), so outliers are spread over their block;
  `equalization=alpha` instead gives int8 tensors a power-of-two factor 2^-k_c per channel (the
  earlier variant, an explicit option for comparison, outside the target's rule: `validate`
  reports its channel-scaled Q/DQ): a linear layer groups its input
  channels by k, runs one MatMulInteger per group and adds the group accumulators after a left
  shift by kmax - k (int64); adds and norms shift per channel;
- requantization: every change of scale is a shift (`Shift`: multiply by 2^e, right shifts
  rounding half up, saturating), since all scales are powers of two; an int32 accumulator
  becomes int8 with the calibrated scale of the float tensor it stands for;
- attention: Q.K^T in MatMulInteger, the 1/sqrt(d) folded into the softmax's scale (I-BERT
  folds the input scale into i-exp's constants, so no multiplier is needed), the 0/1 key mask
  as an additive int32 mask (0 / -2^31), integer softmax to uint16 probabilities (scale 2^-16;
  `probability_bits=8`: uint8, 1/256), then P.V as two MatMulIntegers of P's high and low
  8-bit digits with V (the high one shifted by 8) and a shift to int8;
- residual adds: both operands shifted onto a common power-of-two grid in int32 (exact left
  shifts, or rounding right shifts where a channel is finer than WIDE_BITS of headroom allow),
  added, and fed to the integer LayerNorm (exact isqrt, block floating point) -> int8;
- GELU: the intermediate accumulator shifted to one int32 grid, then I-BERT's i-GELU -> int8;
- exit: DequantizeLinear of the last int8 tensor with its power-of-two scale.

Scales come from calibration: int8 tensors use the configured range method (percentile 99.999
by default) of the float tensor they stand for, rounded up to a power of two
(`edgeq.quant.numerics.qparams` with `scale_pow2`); int32 grids use the min/max bound and keep
WIDE_BITS bits below it (7 bits of headroom in int32). Ranges the `calibrate` pass already
collected are reused; the rest are collected with `edgeq.calibration.collect.calibrate` on the float
graph in one run.

The datapath is also recorded as an `edgeq.backends.fpga.integer.program.IntegerProgram` in the model's
metadata (`edgeq.integer.program`): its numpy reference is the bit-exact functional model
that ONNX Runtime's execution of the graph must match. Host ops are listed in
`edgeq.host_ops`, the calibration samples' input shapes in `edgeq.fpga.input_shapes`, and
every emitted node carries `edgeq.unit` (kind@instance) for the FPGA estimator.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgeq.calibration.collect import CalibrationOptions as StatsOptions
from edgeq.calibration.collect import calibrate
from edgeq.errors import CalibrationError, OptionError
from edgeq.quant.hadamard import Rotation, sylvester
from edgeq.quant.linears import ActivationStream, gptq_quantize, input_statistics
from edgeq.backends.fpga.integer.builder import IntGraphBuilder
from edgeq.backends.fpga.integer.fixedpoint import pow2_exponent
from edgeq.backends.fpga.integer.program import (METADATA_KEY, AddInt, AttentionMask, Dequantize, Digit, GeluInt, HadamardInt,
                                   IntegerProgram, LayerNormInt, MatMulInt, Move, Quantize, Shift, SoftmaxInt)
from edgeq.ir import Graph, Op, Tensor, Value, save
from edgeq.options import CalibrationOptions
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.frontend.patterns import Role, find_roles
from edgeq.quant.numerics import qparams, quantize_weight
from edgeq.quant.plan import OpPlan
from edgeq.registry import register_pass
from edgeq.targets.base import Granularity, QSpec

PROGRAM_KEY = METADATA_KEY
HOST_OPS_KEY = "edgeq.host_ops"
INPUT_SHAPES_KEY = "edgeq.fpga.input_shapes"
UNIT_KEY = "edgeq.unit"
CALIBRATION_DATA = "calibration-data"
STATISTICS = "calibration-statistics"

# An int32 grid keeps this many bits below the calibrated maximum magnitude: 2^-24 relative
# resolution, and 2^7 = 128x the calibrated maximum before saturating.
WIDE_BITS = 24
INT8 = np.dtype(np.int8)
UINT8 = np.dtype(np.uint8)
INT16 = np.dtype(np.int16)
INT32 = np.dtype(np.int32)
INT64 = np.dtype(np.int64)
UINT16 = np.dtype(np.uint16)
PROBABILITY_DIGIT_BITS = 8   # 16-bit probabilities = high * 2^8 + low, two 8-bit digits
FIRST_NORM = ("integer", "host")
SCALE_CHOICES = ("mse", "cover")
WEIGHT_ROUNDING = ("gptq", "nearest")
GPTQ_DAMPING = 0.01   # GPTQ's: 1% of the Hessian's mean diagonal
# A mask constant at or below this is "minus infinity" for softmax in float32.
MASK_LIMIT = -1e4
# Online Walsh-Hadamard blocks: the largest power of two dividing the channel count, capped
# here (log2 of it is the adder stages; 384 -> 128, 1536 -> 512 for MiniLM).
HADAMARD_MAX_BLOCK = 512
ROTATED = "::hadamard"   # calibration name of a rotated tensor: f"{name}{ROTATED}{block}"


@register_pass
class LowerToInteger(Pass):
    name = "lower-to-integer"
    description = ("lower a calibrated transformer encoder to an integer-only datapath: MatMulInteger, "
                   "shift requantization, integer softmax/LayerNorm/GELU (power-of-two scales)")

    def __init__(self, calibration: CalibrationOptions | None = None, *, weight_bits: int = 8,
                 weight_granularity: str = "channel", first_norm: str = "integer",
                 equalization: float | None = None, max_channel_shift: int = 8, weight_rounding: str = "nearest",
                 probability_bits: int = 16, residual_bits: int = 16, rotate: bool = True,
                 scale_choice: str = "mse", threads: int = 1):
        """equalization: None (default) quantizes every tensor with one power-of-two scale;
        alpha in [0, 1] gives int8 tensors whose readers take them power-of-two channel factors
        (linear layers shift the partial sums of channel groups, residual adds and norms shift per
        channel): not per-tensor, so outside the fpga target's rule; an explicit option.
        residual_bits: 16 keeps LayerNorm outputs (the residual stream) in int16, 8 in int8.
        rotate: an online integer Walsh-Hadamard transform on a linear layer's int16 input before
        its int8 requantization (rotation folded into the weights).
        scale_choice: "cover" takes the calibrated range rounded up to a power of two; "mse" takes,
        of that power of two and the next one up and three down, the one with the least expected
        squared error (clipping plus rounding) on the calibration histogram.
        max_channel_shift caps a channel's factor at 2^-max_channel_shift.
        weight_rounding: "gptq" rounds each weight matrix on its power-of-two grid with GPTQ's
        error compensation (Frantar et al., 2023) against the second moments of the layer's
        input on the calibration data; "nearest" rounds to nearest.
        probability_bits: 8 (softmax to uint8, scale 1/256, one 8-bit P.V product) or 16
        (uint16, scale 2^-16, P.V as two 8-bit products of P's high and low digits)."""
        if weight_bits not in (8, 4, 2):
            raise OptionError(f"weight_bits must be 8, 4 or 2, not {weight_bits}")
        if weight_granularity not in ("channel", "tensor"):
            raise OptionError(f"weight_granularity must be 'channel' or 'tensor', not {weight_granularity!r}")
        if first_norm not in FIRST_NORM:
            raise OptionError(f"first_norm must be one of {FIRST_NORM}, not {first_norm!r}")
        if equalization is not None and not 0.0 <= equalization <= 1.0:
            raise OptionError(f"equalization must be None or in [0, 1], not {equalization!r}")
        if max_channel_shift < 0:
            raise OptionError("max_channel_shift must be >= 0")
        if weight_rounding not in WEIGHT_ROUNDING:
            raise OptionError(f"weight_rounding must be one of {WEIGHT_ROUNDING}, not {weight_rounding!r}")
        self.equalization = equalization
        self.max_channel_shift = max_channel_shift
        self.weight_rounding = weight_rounding
        if probability_bits not in (8, 16):
            raise OptionError(f"probability_bits must be 8 or 16, not {probability_bits}")
        self.probability_bits = probability_bits
        if residual_bits not in (8, 16):
            raise OptionError(f"residual_bits must be 8 or 16, not {residual_bits}")
        self.residual_bits = residual_bits
        self.rotate = rotate
        if scale_choice not in SCALE_CHOICES:
            raise OptionError(f"scale_choice must be one of {SCALE_CHOICES}, not {scale_choice!r}")
        self.scale_choice = scale_choice
        self.calibration = calibration or CalibrationOptions()
        self.weight_bits = weight_bits
        self.weight_granularity = weight_granularity
        self.first_norm = first_norm
        self.threads = max(1, threads)

    @classmethod
    def from_options(cls, options, target) -> LowerToInteger:
        if options.group:
            raise OptionError(f"target {target.name} takes per-channel or per-tensor weights, not blocks",
                              fix="drop --group")
        if options.activations not in (None, "int8"):
            raise OptionError(f"target {target.name} runs int8 activations only",
                              fix="drop --activations or use int8")
        rounding = getattr(options, "weight_rounding", "rtn")
        if rounding not in ("auto", "rtn", "gptq"):
            raise OptionError(f"target {target.name} rounds weights to nearest or with GPTQ, not {rounding!r}",
                              fix="use --weight-rounding rtn or gptq")
        return cls(options.calibration, weight_bits=4 if options.weights == "int4" else 8,
                   weight_rounding="gptq" if rounding == "gptq" else "nearest", threads=options.threads or 1)

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        if ctx.target is None:
            raise OptionError("lower-to-integer needs a target in the pass context")

    def ensures(self, graph: Graph, ctx: PassContext) -> None:
        """Per-tensor activations (equalization=None): no tensor of the datapath has channel
        scales, and every multiplier input is 8 bits wide."""
        program = ctx.artifacts.get(self.name)
        if program is None or self.equalization is not None:
            return
        if program.channel_scaled():
            raise OptionError(f"lower-to-integer left per-channel activation scales: {program.channel_scaled()[0]}")
        for op in graph.topo_order():
            if op.op_type == "MatMulInteger":
                wide = [v.name for v in graph.inputs_of(op)[:2]
                        if v.elem_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)]
                if wide:
                    raise OptionError(f"MatMulInteger '{op.name}' reads {wide[0]}, which is not 8-bit")

    # ---- specs --------------------------------------------------------------------------
    def _specs(self, ctx: PassContext) -> tuple[QSpec, QSpec]:
        target = ctx.target
        act = target.activation.replace(scale_pow2=True, symmetric=True)
        weight = target.weight.replace(scale_pow2=True, symmetric=True, dtype="int8", block_size=None,
                                       granularity=Granularity.CHANNEL if self.weight_granularity == "channel"
                                       else Granularity.TENSOR)
        if self.weight_bits < 8:
            weight = weight.replace(qrange=(-(1 << (self.weight_bits - 1)), (1 << (self.weight_bits - 1)) - 1))
        if act.dtype != "int8":
            raise OptionError(f"lower-to-integer emits int8 activations; target {target.name} asks for {act.dtype}")
        return act, weight

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        act, weight = self._specs(ctx)
        # 1. Which float tensors need ranges: a dry run of the lowering records its requests.
        recorder = _RecordingRanges(graph)
        self._lowering(graph, act, weight, recorder).run()
        # 2. Their statistics: reuse the calibrate pass's, collect the rest in one run.
        ranges = self._ranges(graph, ctx, recorder)
        # 3. The real lowering, spliced into the graph.
        lowering = self._lowering(graph, act, weight, ranges)
        lowering.run()
        replaced = _splice(graph, lowering)
        for table, rows in lowering.table_updates:   # the host's embedding tables, pre-rotated
            graph.set_const(table, rows)
        _raise_opset(graph, lowering.host)
        _set_metadata(graph, {
            PROGRAM_KEY: lowering.program.to_json(),
            HOST_OPS_KEY: json.dumps([{"name": op.name, "op_type": op.op_type, "why": why}
                                      for op, why in lowering.host_ops()]),
            INPUT_SHAPES_KEY: json.dumps(_sample_shapes(ctx)),
        })
        ctx.artifacts[self.name] = lowering.program
        self._update_plan(ctx, lowering)
        census = {}
        for step in lowering.program.steps:
            census[step.kind] = census.get(step.kind, 0) + 1
        stats = {"float_ops_lowered": len(lowering.lowered), "host_ops": len(lowering.host),
                 "outputs_dequantized": replaced, "tensors_calibrated": len(recorder.names),
                 **{f"steps_{k}": v for k, v in sorted(census.items())}}
        return PassResult(graph, True, stats)

    def _lowering(self, graph: Graph, act: QSpec, weight: QSpec, ranges: _Ranges) -> _Lowering:
        return _Lowering(graph, act, weight, self.first_norm, ranges, self.equalization, self.max_channel_shift,
                         self.probability_bits, self.residual_bits, self.rotate, self.scale_choice)

    def _ranges(self, graph: Graph, ctx: PassContext, recorder: _RecordingRanges) -> _Ranges:
        """Statistics of the requested tensors: the calibrate pass's where they carry
        per-channel min/max, the rest from one calibration run of the float graph."""
        known = ctx.artifacts.get(STATISTICS) or {}
        usable = {n for n in recorder.names if n in known and known[n].channel_min is not None}
        missing = [n for n in recorder.names if n not in usable]
        stats = {n: known[n] for n in usable}
        if missing:
            data = ctx.artifacts.get(CALIBRATION_DATA)
            if data is None:
                raise CalibrationError(f"{len(missing)} tensors of the integer datapath need calibration data",
                                       fix="pass --calib DIR|FILE.npz or calibration=... to compile")
            options = StatsOptions(histogram=self.calibration.method != "minmax", channel_axis=-1,
                                   threads=self.threads)
            with tempfile.TemporaryDirectory(prefix="edgeq-lower-") as tmp:
                path = Path(tmp) / "float.onnx"
                save(_with_rotations(graph, missing), path)
                result = calibrate(str(path), data, missing, options)
            stats.update((n, result[n]) for n in missing)
        ranges = _Ranges(stats, self.calibration)
        if self.weight_rounding == "gptq" and recorder.linear_inputs:
            data = ctx.artifacts.get(CALIBRATION_DATA)
            if data is None:
                raise CalibrationError("GPTQ weight rounding needs calibration data",
                                       fix="pass calibration data, or weight_rounding='nearest'")
            with ActivationStream(graph, data, self.threads) as stream:
                stats = input_statistics(stream, recorder.linear_inputs)
            ranges.moments = {name: entry.hessian for name, entry in stats.items()}
        return ranges

    @staticmethod
    def _update_plan(ctx: PassContext, lowering: _Lowering) -> None:
        """The select-precision plan, if any, now says what actually runs in integer."""
        plan = ctx.artifacts.get("select-precision")
        if plan is None:
            return
        plan.ops = [OpPlan(op) for op in lowering.lowered]
        plan.kept_high = list(lowering.host_ops())


# ---- ranges ---------------------------------------------------------------------------------


class _Ranges:
    """Calibrated ranges: `act` for int8 tensors (configured method), `bound` for int32 grids."""

    def __init__(self, stats, options: CalibrationOptions):
        self.stats = stats
        self.options = options
        self.moments: dict[str, np.ndarray] = {}   # linear input -> X^T X over calibration tokens

    def second_moment(self, name: str) -> np.ndarray | None:
        return self.moments.get(name)

    def act(self, name: str) -> tuple[float, float]:
        return self.stats[name].range(self.options.method, symmetric=True, percentile=self.options.percentile,
                                      num_bits=8)

    def pow2_mse(self, name: str, scale: float, spec: QSpec) -> float:
        """Of scale * 2^j, j = 1, 0, -1, -2, -3, the one with the least expected squared error on
        the calibration histogram (bin centres: beyond the int range the clipped distance squared,
        inside step^2 / 12); `scale` itself without a histogram (minmax calibration)."""
        hist = self.stats[name].histogram
        if hist is None or not hist.counts.sum():
            return scale
        edges = hist.edges()
        centres, counts = (edges[:-1] + edges[1:]) / 2, hist.counts.astype(np.float64)
        best, best_error = scale, math.inf
        for j in (0, 1, -1, -2, -3):   # the covering one first: it wins ties
            step = math.ldexp(scale, j)
            lo, hi = spec.qmin * step, spec.qmax * step
            error = float((counts * np.where(centres > hi, (centres - hi) ** 2,
                                             np.where(centres < lo, (centres - lo) ** 2, step * step / 12))).sum())
            if error < best_error:
                best, best_error = step, error
        return best

    def bound(self, name: str) -> float:
        lo, hi = self.stats[name].range("minmax", symmetric=True)
        return float(max(-lo, hi))

    def channel(self, name: str) -> np.ndarray:
        """Largest magnitude per last-axis channel (min/max over the calibration data)."""
        return np.asarray(self.stats[name].channel_range(symmetric=True)[1], np.float64)


class _RecordingRanges(_Ranges):
    """Dry-run ranges: answers (-1, 1) and remembers every tensor asked for."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.names: list[str] = []
        self.linear_inputs: list[str] = []

    def second_moment(self, name):
        if name not in self.linear_inputs:
            self.linear_inputs.append(name)
        return None

    def channel(self, name):
        self._note(name)
        shape = self.graph.value(name).shape
        if not shape or not isinstance(shape[-1], int):
            raise OptionError(f"'{name}' has no static last dimension (run shape inference first)")
        return np.ones(shape[-1])

    def _note(self, name: str) -> None:
        if name not in self.names:
            self.names.append(name)

    def act(self, name):
        self._note(name)
        return -1.0, 1.0

    def pow2_mse(self, name, scale, spec):
        return scale

    def bound(self, name):
        self._note(name)
        return 1.0


# ---- the lowering ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Form:
    """The integer representation of a float tensor: real = int * scale."""

    name: str
    dtype: np.dtype
    scale: np.ndarray           # float64, () per tensor or (C,) per last-axis channel
    unit: str = ""              # hardware unit that produced it
    mask: str | None = None     # additive attention mask still to be applied (masked scores)

    @property
    def per_tensor(self) -> bool:
        return self.scale.ndim == 0


def _scale_field(scale: np.ndarray) -> float | tuple[float, ...]:
    """A step's scale field: a float per tensor, a tuple per channel."""
    return float(scale) if np.ndim(scale) == 0 else tuple(float(s) for s in scale)


def _exponent(ratio: np.ndarray, what: str) -> int | tuple[int, ...]:
    """e with ratio == 2^e exactly (per element); a non-power-of-two ratio is an error."""
    flat = np.ravel(ratio)
    ks = [pow2_exponent(float(r)) for r in flat]
    if any(k is None for k in ks):
        raise OptionError(f"{what}: scale ratio {flat[[k is None for k in ks]][0]!r} is not a power of two, "
                          "so requantizing would need a multiplier",
                          fix="the fpga target is shift-only; this pattern is not supported")
    exps = [-k for k in ks]
    return exps[0] if np.ndim(ratio) == 0 else tuple(exps)


class _Lowering:
    def __init__(self, graph: Graph, act: QSpec, weight: QSpec, first_norm: str, ranges: _Ranges,
                 equalization: float | None = None, max_channel_shift: int = 8, probability_bits: int = 8,
                 residual_bits: int = 8, rotate: bool = False, scale_choice: str = "cover"):
        self.graph = graph
        self.scale_choice = scale_choice
        self.residual_bits = residual_bits
        self.rotate = rotate
        self.rotations: dict[str, tuple[_Form, Rotation]] = {}   # wide tensor -> its rotated int8 form
        self.probability_bits = probability_bits
        self.equalization = equalization
        self.max_channel_shift = max_channel_shift
        self.act_spec = act
        self.weight_spec = weight
        self.first_norm = first_norm
        self.ranges = ranges
        self.b = IntGraphBuilder("fpga", reserved=[v.name for v in graph.values()])
        self.program = IntegerProgram()
        self.forms: dict[str, _Form] = {}
        self.narrow: dict[str, _Form] = {}     # int8 per-tensor forms of wider tensors
        self.table_updates: list[tuple[Value, np.ndarray]] = []   # host embedding tables, rotated
        self.done: set[Op] = set()
        self.lowered: list[Op] = []
        self.host: set[Op] = set()
        self.masks: dict[str, str] = {}
        self.gathered: dict[tuple[str, bytes], str] = {}
        self.outputs: list[tuple[Value, str]] = []
        self.roles = find_roles(graph)

    # ---- driver ---------------------------------------------------------------------------
    def run(self) -> None:
        graph = self.graph
        order = graph.topo_order()
        norms = [op for op in order if op.op_type == "LayerNormalization" and not op.domain]
        if not norms:
            raise OptionError("the fpga lowering found no LayerNormalization: it lowers transformer encoders "
                              "(embedding, then norm, attention and MLP blocks)",
                              fix="export the model with fused LayerNormalization (opset >= 17)")
        first = norms[0]
        entry = graph.inputs_of(first)[0] if self.first_norm == "integer" else graph.outputs_of(first)[0]
        self.host = graph.ancestors(entry)
        self.done |= self.host
        tables = self.rotatable_tables(entry, first) if self.rotate and self.first_norm == "integer" else None
        if tables:
            self.rotated_entry(entry, tables)
        else:
            scale = self.out_scale(entry)
            name = self.program.add(Quantize(entry.name, _scale_field(scale), unit=""), self.b)
            self.forms[entry.name] = _Form(name, INT8, scale)
        for op in order:
            if op in self.done:
                continue
            if not any(v is not None and v.name in self.forms for v in graph.inputs_of(op)):
                continue
            self.lower(op)
        for value in graph.outputs:
            if value.name not in self.forms:
                continue
            form = self.forms[value.name]
            if form.dtype != INT8:
                form = self.int8(value.name)
            out = self.program.add(Dequantize(form.name, _scale_field(form.scale), unit=""), self.b)
            self.outputs.append((value, out))
            self.program.outputs.append((out, value.name))
        if not self.outputs:
            raise OptionError("no graph output is computed by the integer datapath")
        for name, form in self.forms.items():
            if form.mask is None:
                scale = float(form.scale) if form.per_tensor else [float(s) for s in form.scale]
                self.program.probes[name] = (form.name, scale)

    def rotatable_tables(self, entry: Value, norm: Op) -> list[Value] | None:
        """The embedding tables whose rows sum to `entry` (an Add tree of Gathers of [V, C]
        initializers read by nothing else, `entry` read only by the first norm), or None."""
        graph = self.graph
        channels = entry.shape[-1] if entry.shape else None
        if not isinstance(channels, int) or _hadamard_block(channels) < 2 or graph.is_graph_output(entry) \
                or [reader for reader, _ in graph.uses(entry)] != [norm]:
            return None
        tables, stack = [], [entry]
        while stack:
            value = stack.pop()
            op = graph.producer(value)
            if op is None or op.domain or (value is not entry and (len(graph.uses(value)) != 1
                                                                  or graph.is_graph_output(value))):
                return None
            ins = graph.inputs_of(op)
            if op.op_type == "Add" and len(ins) == 2 and not any(graph.is_const(v) for v in ins):
                stack.extend(ins)
            elif op.op_type == "Gather" and op.attr("axis", 0) == 0 and ins[0].const is not None \
                    and ins[0].const.numpy().ndim == 2 and ins[0].const.numpy().shape[1] == channels \
                    and len(graph.uses(ins[0])) == 1:
                tables.append(ins[0])
            else:
                return None
        return tables

    def rotated_entry(self, entry: Value, tables: list[Value]) -> None:
        """The embedding sum enters rotated: each table's rows are multiplied by H_b / b on the
        host side (a weight change, the host still only looks rows up and adds them), the sum is
        quantized to int8 with one scale (the outlier channels spread over their blocks), and the
        datapath's first step multiplies by H_b again (integer adds; H_b H_b = b I): the int32
        embedding sum on the same power-of-two scale, read by the first LayerNorm."""
        channels = int(entry.shape[-1])
        block = _hadamard_block(channels)
        # range of x H_b / b: that of the calibrated x H_b over b (a power of two: exact)
        scale = np.asarray(self.act_scale(f"{entry.name}{ROTATED}{block}") / block, np.float64)
        unit = f"hadamard@{entry.name}"
        name = self.program.add(Quantize(entry.name, float(scale), unit=""), self.b)
        out = self.emit(HadamardInt(name, block, "int32", unit=unit))
        self.forms[entry.name] = _Form(out, INT32, scale, unit)
        rotation = Rotation((sylvester(block),), blocks=channels // block)
        for table in tables:
            rows = table.const.numpy()
            self.table_updates.append(
                (table, (rotation.apply(rows.astype(np.float64), 1) / math.sqrt(block)).astype(rows.dtype)))

    def host_ops(self) -> Iterable[tuple[Op, str]]:
        for op in self.graph.topo_order():
            if op in self.host:
                yield op, ("host op: embedding lookup and sum before the first QuantizeLinear"
                           if op.op_type != "LayerNormalization" else
                           "host op: first LayerNorm, before the first QuantizeLinear (first_norm='host')")

    def lower(self, op: Op) -> None:
        t = op.op_type
        if op.domain:
            raise self.unsupported(op)
        if self.roles.role(op) == Role.GELU or t == "Gelu":
            self.gelu(op)
        elif t == "MatMul":
            w = self.graph.inputs_of(op)[1]
            self.linear(op) if self.graph.is_const(w) else self.act_matmul(op)
        elif t == "Add":
            self.add(op)
        elif t in ("Div", "Mul"):
            self.rescale(op)
        elif t == "Softmax":
            self.softmax(op)
        elif t in ("Reshape", "Transpose"):
            self.move(op)
        elif t == "LayerNormalization":
            self.layer_norm(op)
        else:
            raise self.unsupported(op)
        self.done.add(op)
        self.lowered.append(op)

    @staticmethod
    def unsupported(op: Op) -> OptionError:
        return OptionError(f"the fpga lowering has no integer rule for {op.kind} '{op.name}'",
                           fix="the fpga target lowers BERT-style encoders (MatMul, Add, Softmax, "
                               "LayerNormalization, GELU, Reshape/Transpose)")

    # ---- forms and scales --------------------------------------------------------------------
    def act_scale(self, name: str) -> float:
        lo, hi = self.ranges.act(name)
        scale = float(qparams(lo, hi, self.act_spec)[0])
        return self.ranges.pow2_mse(name, scale, self.act_spec) if self.scale_choice == "mse" else scale

    def out_scale(self, value: Value) -> np.ndarray:
        """The int8 scale of `value`: per tensor, or with equalization and readers that take it,
        per last-axis channel: s_t * 2^-k_c, s_t covering the tensor's max and k_c =
        min(floor(alpha * log2(s_t / s_c)), max_channel_shift), s_c covering channel c's max."""
        if self.equalization is None or not self.takes_channel_scales(value):
            return np.asarray(self.act_scale(value.name), np.float64)
        return self.channel_scales(value, self.alpha_for(value))

    def alpha_for(self, value: Value) -> float:
        return self.equalization

    def channel_scales(self, value: Value, alpha: float) -> np.ndarray:
        amax = self.ranges.channel(value.name)
        tensor = float(qparams(-amax.max(), amax.max(), self.act_spec)[0])
        channel = qparams(-amax, amax, self.act_spec)[0].astype(np.float64)
        k = np.floor(alpha * np.log2(tensor / channel) + 1e-9)
        k = np.clip(k, 0, self.max_channel_shift)
        return tensor * np.exp2(-k)

    def takes_channel_scales(self, value: Value) -> bool:
        """Whether every reader of `value` takes one power-of-two scale per last-axis channel:
        linear layers (partial sums per channel group, shifted), residual adds and norms
        (shifts per channel)."""
        graph = self.graph
        for reader, slot in graph.uses(value):
            ins = graph.inputs_of(reader)
            if reader.op_type == "MatMul" and slot == 0 and graph.is_const(ins[1]):
                continue
            if reader.op_type == "Add" and not any(graph.is_const(v) for v in ins) and \
                    self.roles.role(reader) != Role.GELU:
                continue
            if reader.op_type == "LayerNormalization" and slot == 0:
                continue
            return False
        return True

    def int16_scale(self, name: str) -> np.ndarray:
        """The power-of-two int16 scale covering the calibrated min/max bound of `name` (a wide
        tensor saturates nothing that calibration saw; its int8 requantization clips)."""
        bound = self.ranges.bound(name)
        return np.asarray(math.ldexp(1.0, math.ceil(math.log2(bound / 32767.0))) if bound > 0 else 1.0,
                          np.float64)

    def wide_scale(self, name: str, forms: Iterable[_Form]) -> float:
        """A power-of-two int32 grid for `name`: no finer than its inputs need, WIDE_BITS below
        the calibrated bound."""
        finest = min(float(np.min(f.scale)) for f in forms)
        bound = self.ranges.bound(name)
        if bound <= 0:
            return finest
        floor = math.ldexp(1.0, math.ceil(math.log2(bound)) - WIDE_BITS)
        return max(finest, floor)

    def form(self, value: Value) -> _Form:
        try:
            return self.forms[value.name]
        except KeyError:
            raise OptionError(f"'{value.name}' is read inside the integer datapath but is not integer",
                              fix="the fpga lowering supports inputs from the datapath, constants and the "
                                  "attention mask only") from None

    def emit(self, step) -> str:
        return self.program.add(step, self.b)

    def int8(self, name: str) -> _Form:
        """The form of float tensor `name` as int8 per tensor (a shift when it is not yet)."""
        form = self.forms[name]
        if form.mask is not None:
            raise OptionError(f"masked scores '{name}' must go to a Softmax")
        if form.dtype in (INT8, UINT8) and form.per_tensor:
            return form
        if name not in self.narrow:  # kept apart: a residual add still reads the wide form
            scale = self.act_scale(name)
            exponent = _exponent(form.scale / scale, f"requantizing '{name}'")
            out = self.emit(Shift(form.name, exponent, "int8", unit=form.unit))
            self.narrow[name] = _Form(out, INT8, np.asarray(scale, np.float64), form.unit)
        return self.narrow[name]

    def align(self, form: _Form, scale: float, unit: str, what: str) -> _Form:
        """`form` on the int32 grid `scale`."""
        if form.dtype == INT32 and form.per_tensor and float(form.scale) == scale:
            return form
        exponent = _exponent(form.scale / scale, what)
        out = self.emit(Shift(form.name, exponent, "int32", unit=unit))
        return _Form(out, INT32, np.asarray(scale, np.float64), unit)

    # ---- rules ------------------------------------------------------------------------------
    def linear(self, op: Op) -> None:
        """x [..., K] @ W [K, N] (+ bias) -> an int32/int64 accumulator with one power-of-two
        scale per output channel. W is quantized per output channel (powers of two). When x
        has per-channel scales s * 2^-k_c, the channels are grouped by k, each group is one
        MatMulInteger, and the group accumulators are added after a left shift by kmax - k:
        x's channel scales cost shifts of partial sums, never weight precision."""
        graph = self.graph
        x_value, w_value = graph.inputs_of(op)
        x = self.forms[x_value.name]
        w = graph.constant(w_value).numpy().astype(np.float32)
        if w.ndim != 2:
            raise OptionError(f"MatMul '{op.name}': weight of rank {w.ndim}; the fpga lowering takes [K, N] weights")
        moment = self.ranges.second_moment(x_value.name)
        rotation = None
        if x.dtype not in (INT8, UINT8) and x.per_tensor and self.rotate and _hadamard_block(w.shape[0]) > 1:
            x, rotation = self.rotated(x_value.name)
            # x W = (x H)(H^T W) / b with H H^T = b I: the rotation and its 1/b fold into the
            # float weights before they are quantized (Q = H / sqrt(b) orthogonal)
            root = math.sqrt(rotation.block_order)
            w = (rotation.apply(w.astype(np.float64), 0) / root).astype(np.float32)
            if moment is not None:
                moment = rotation.apply(rotation.apply(moment, 0), 1) * rotation.block_order
        elif x.dtype not in (INT8, UINT8):
            x = self.int8(x_value.name)
        if moment is None:
            q, w_scale = _pow2_weight(w, self.weight_spec)
        else:  # GPTQ against the second moments of the layer's input
            q, scale, _ = gptq_quantize(w, moment, self.weight_spec, damp=GPTQ_DAMPING, clip_ratios=(1.0, 0.5))
            q, w_scale = q.astype(np.int8), np.asarray(scale, np.float64)
        x_scale = float(np.max(x.scale))
        shifts = np.zeros(w.shape[0], np.int64) if x.per_tensor else np.asarray(
            [-_exponent(np.asarray(r), f"input channels of '{op.name}'") for r in x.scale / x_scale], np.int64)
        finest = int(shifts.max())
        acc_scale = x_scale * 2.0**-finest * w_scale
        out = graph.outputs_of(op)[0]
        bias, result = None, out
        readers = graph.consumers(out)
        if len(readers) == 1 and readers[0].op_type == "Add" and not graph.is_graph_output(out):
            add = readers[0]
            other = [v for v in graph.inputs_of(add) if v is not out]
            const = graph.constant(other[0]) if len(other) == 1 else None
            if const is not None and const.numpy().size == w.shape[1] and const.numpy().ndim <= 1:
                bias = np.round(const.numpy().astype(np.float64).reshape(-1) / acc_scale)
                if np.any(np.abs(bias) >= 2**31):
                    raise OptionError(f"bias of '{op.name}' overflows int32 at the accumulator's scale")
                self.done.add(add)
                self.lowered.append(add)
                result = graph.outputs_of(add)[0]
        unit = f"linear@{op.name}"
        groups = sorted(set(shifts.tolist()), reverse=True)  # finest first: it takes the bias
        if len(groups) == 1:
            bias_name = None if bias is None else self.b.const(bias.astype(np.int32), INT32, "bias")
            name = self.emit(MatMulInt(x.name, self.b.const(q, INT8, "weight"), bias_name, unit=unit))
            self.forms[result.name] = _Form(name, INT32, np.asarray(acc_scale, np.float64), unit)
            return
        total = None
        for k in groups:
            rows = np.flatnonzero(shifts == k)
            part = self.channels(x, rows)
            bias_name = None if bias is None or total is not None else self.b.const(bias.astype(np.int32), INT32,
                                                                                   "bias")
            acc = self.emit(MatMulInt(part, self.b.const(q[rows], INT8, "weight"), bias_name, unit=unit))
            acc = self.emit(Shift(acc, finest - k, "int64", unit=unit))
            total = acc if total is None else self.emit(AddInt(total, acc, "int64", unit=unit))
        self.forms[result.name] = _Form(total, INT64, np.asarray(acc_scale, np.float64), unit)

    def rotated(self, name: str) -> tuple[_Form, Rotation]:
        """The wide (int16) tensor `name` after an online Walsh-Hadamard transform (integer adds
        and subtracts, blocks of b channels), requantized once to int8 with one power-of-two
        scale: the calibrated range of the float tensor x @ blockdiag(H_b). Outlier channels are
        spread over their block, so one scale per tensor serves every channel."""
        if name not in self.rotations:
            x = self.forms[name]
            channels = int(self.graph.value(name).shape[-1])
            block = _hadamard_block(channels)
            unit = f"hadamard@{name}"
            if x.dtype != INT16:   # an accumulator: to int16 first (|H x| <= b * 2^15 fits int32)
                scale16 = self.int16_scale(name)
                x = _Form(self.emit(Shift(x.name, _exponent(x.scale / scale16, f"narrowing '{name}'"), "int16",
                                          unit=unit)), INT16, scale16, unit)
            y = self.emit(HadamardInt(x.name, block, "int32", unit=unit))
            scale = self.act_scale(f"{name}{ROTATED}{block}")
            exponent = _exponent(x.scale / scale, f"requantizing the rotated '{name}'")
            out = self.emit(Shift(y, exponent, "int8", unit=unit))
            rotation = Rotation((sylvester(block),), blocks=channels // block)
            self.rotations[name] = (_Form(out, INT8, np.asarray(scale, np.float64), unit), rotation)
        return self.rotations[name]

    def wide_for_linears(self, value: Value) -> bool:
        """Whether `value` is read only by linear layers (as their activation), so an int16
        output feeding the online Hadamard transform can replace its int8 requantization."""
        graph = self.graph
        uses = graph.uses(value)
        return bool(uses) and not graph.is_graph_output(value) and all(
            reader.op_type == "MatMul" and slot == 0 and graph.is_const(graph.inputs_of(reader)[1])
            for reader, slot in uses)

    def channels(self, x: _Form, rows: np.ndarray) -> str:
        """x's last-axis channels `rows` (a Gather, shared by the linears reading x)."""
        key = (x.name, rows.tobytes())
        if key not in self.gathered:
            self.gathered[key] = self.emit(Move(x.name, "Gather", indices=tuple(int(r) for r in rows)))
        return self.gathered[key]

    def act_matmul(self, op: Op) -> None:
        """Activation x activation (Q.K^T, P.V) in MatMulInteger. 16-bit probabilities enter as
        two 8-bit digits, P = high * 2^8 + low: two products, the high one shifted by 8."""
        a_value, b_value = self.graph.inputs_of(op)
        unit = f"attention@{op.name}"
        a = self.form(a_value)
        b = self.int8(b_value.name)
        if a.dtype == UINT16 and a.per_tensor and a.unit.startswith("softmax@"):
            high = self.emit(Digit(a.name, PROBABILITY_DIGIT_BITS, True, unit=unit))
            low = self.emit(Digit(a.name, PROBABILITY_DIGIT_BITS, False, unit=unit))
            high = self.emit(Shift(self.emit(MatMulInt(high, b.name, unit=unit)), PROBABILITY_DIGIT_BITS, "int64",
                                   unit=unit))
            name = self.emit(AddInt(high, self.emit(MatMulInt(low, b.name, unit=unit)), "int64", unit=unit))
            self.forms[self.graph.outputs_of(op)[0].name] = _Form(name, INT64, a.scale * b.scale, unit)
            return
        a = self.int8(a_value.name)
        name = self.emit(MatMulInt(a.name, b.name, unit=unit))
        self.forms[self.graph.outputs_of(op)[0].name] = _Form(name, INT32, a.scale * b.scale, unit)

    def rescale(self, op: Op) -> None:
        """x / c or x * c with a constant scalar c: only the scale changes, no op is emitted (a
        consumer that needs a power-of-two scale fails to requantize; softmax folds it)."""
        ins = self.graph.inputs_of(op)
        const = [self.graph.constant(v) for v in ins]
        if len(ins) != 2 or sum(c is not None for c in const) != 1:
            raise self.unsupported(op)
        c = const[0] if const[0] is not None else const[1]
        x = ins[1] if const[0] is not None else ins[0]
        if c.numpy().size != 1 or (op.op_type == "Div" and const[1] is None):
            raise self.unsupported(op)
        factor = float(c.numpy().reshape(()))
        if not (factor > 0 and math.isfinite(factor)):
            raise OptionError(f"{op.op_type} '{op.name}' by {factor}: only positive constant factors fold into a scale")
        form = self.form(x)
        scale = form.scale / factor if op.op_type == "Div" else form.scale * factor
        self.forms[self.graph.outputs_of(op)[0].name] = replace(form, scale=np.asarray(scale, np.float64))

    def add(self, op: Op) -> None:
        graph = self.graph
        a, b = graph.inputs_of(op)
        out = graph.outputs_of(op)[0]
        if a.name in self.forms and b.name in self.forms:
            return self.residual(op, self.forms[a.name], self.forms[b.name], out)
        scores, other = (a, b) if a.name in self.forms else (b, a)
        if graph.is_const(other):
            raise OptionError(f"Add '{op.name}' of a constant outside a linear layer's bias is not supported")
        mask = self.attention_mask(other, op)
        form = self.forms[scores.name]
        if form.mask is not None or form.dtype != INT32 or not form.per_tensor:
            raise OptionError(f"Add '{op.name}': the attention mask must be added to int32 scores")
        self.forms[out.name] = replace(form, mask=mask)

    def residual(self, op: Op, a: _Form, b: _Form, out: Value) -> None:
        readers = self.graph.consumers(out)
        single_norm = (len(readers) == 1 and readers[0].op_type == "LayerNormalization"
                       and not self.graph.is_graph_output(out))
        unit = f"residual_layernorm@{readers[0].name}" if single_norm else f"add@{op.name}"
        scale = self.wide_scale(out.name, (a, b))
        left = self.align(a, scale, unit, f"residual add '{op.name}'")
        right = self.align(b, scale, unit, f"residual add '{op.name}'")
        name = self.emit(AddInt(left.name, right.name, "int32", unit=unit))
        self.forms[out.name] = _Form(name, INT32, np.asarray(scale, np.float64), unit)

    def attention_mask(self, value: Value, reader: Op) -> str:
        """The integer additive mask for HF's (1 - mask[:, None, None, :]) * large_negative."""
        if value.name in self.masks:
            return self.masks[value.name]
        graph = self.graph
        problem = f"Add '{reader.name}': '{value.name}' is not an additive attention mask of a 0/1 input"
        mul = graph.producer(value)
        if mul is None or mul.op_type != "Mul":
            raise OptionError(problem)
        ins = graph.inputs_of(mul)
        consts = [graph.constant(v) for v in ins]
        if sum(c is not None for c in consts) != 1:
            raise OptionError(problem)
        factor = consts[0] if consts[0] is not None else consts[1]
        sub = graph.producer(ins[1] if consts[0] is not None else ins[0])
        if factor.numpy().size != 1 or float(factor.numpy().reshape(())) > MASK_LIMIT or sub is None \
                or sub.op_type != "Sub":
            raise OptionError(problem)
        one = graph.constant(graph.inputs_of(sub)[0])
        cast = graph.producer(graph.inputs_of(sub)[1])
        if one is None or one.numpy().size != 1 or float(one.numpy().reshape(())) != 1.0 or cast is None \
                or cast.op_type != "Cast":
            raise OptionError(problem)
        unsqueeze = graph.producer(graph.inputs_of(cast)[0])
        if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
            raise OptionError(problem)
        source, axes_value = (graph.inputs_of(unsqueeze) + [None])[:2]
        axes = graph.constant(axes_value).numpy().tolist() if axes_value is not None else unsqueeze.attr("axes")
        if source is None or graph.producer(source) is not None or source.elem_type not in (
                onnx.TensorProto.INT64, onnx.TensorProto.INT32) or axes is None:
            raise OptionError(problem)
        if not self.b.knows(source.name):
            self.b.declare_value(source.name, onnx.helper.tensor_dtype_to_np_dtype(source.elem_type))
        name = self.emit(AttentionMask(source.name, tuple(int(a) for a in axes), unit="mask@attention_mask"))
        self.masks[value.name] = name
        return name

    def softmax(self, op: Op) -> None:
        x_value = self.graph.inputs_of(op)[0]
        rank = len(x_value.shape) if x_value.shape is not None else None
        axis = op.attr("axis", -1)
        if axis != -1 and (rank is None or axis != rank - 1):
            raise OptionError(f"Softmax '{op.name}' over axis {axis}: the integer softmax runs over the last axis")
        x = self.form(x_value)
        if not x.per_tensor or x.dtype not in (INT8, INT32):
            raise OptionError(f"Softmax '{op.name}': scores must be int8/int32 with one scale")
        unit = f"softmax@{op.name}"
        wide = self.probability_bits == 16
        name = self.emit(SoftmaxInt(x.name, float(x.scale), x.mask, "uint16" if wide else "uint8", unit=unit))
        self.forms[self.graph.outputs_of(op)[0].name] = _Form(name, UINT16 if wide else UINT8,
                                                              np.asarray(2.0**-16 if wide else 2.0**-8), unit)

    def move(self, op: Op) -> None:
        ins = self.graph.inputs_of(op)
        x = self.forms[ins[0].name]
        # a wide tensor with one scale moves as it is (a linear layer reading it rotates it
        # before its int8 requantization); channel-scaled ones are narrowed first
        if not (self.rotate and x.per_tensor and x.mask is None and x.dtype in (INT16, INT32, INT64)):
            x = self.int8(ins[0].name)
        if op.op_type == "Reshape":
            shape = self.graph.constant(ins[1]) if len(ins) > 1 else None
            if shape is None or op.attr("allowzero", 0):
                raise OptionError(f"Reshape '{op.name}' needs a constant shape (allowzero=0)")
            step = Move(x.name, "Reshape", shape=tuple(int(d) for d in shape.numpy().reshape(-1)))
        else:
            perm = op.attr("perm")
            if perm is None:
                raise OptionError(f"Transpose '{op.name}' without perm is not supported")
            step = Move(x.name, "Transpose", perm=tuple(int(p) for p in perm))
        name = self.emit(step)
        self.forms[self.graph.outputs_of(op)[0].name] = replace(x, name=name)

    def layer_norm(self, op: Op) -> None:
        graph = self.graph
        ins = graph.inputs_of(op)
        x_value = ins[0]
        rank = len(x_value.shape) if x_value.shape is not None else None
        axis = op.attr("axis", -1)
        if axis != -1 and (rank is None or axis != rank - 1):
            raise OptionError(f"LayerNormalization '{op.name}' over axis {axis}: only the last axis is supported")
        gamma = graph.constant(ins[1])
        beta = graph.constant(ins[2]) if len(ins) > 2 and ins[2] is not None else None
        if gamma is None or (len(ins) > 2 and ins[2] is not None and beta is None):
            raise OptionError(f"LayerNormalization '{op.name}' needs constant scale and bias")
        x = self.form(x_value)
        unit = x.unit if x.unit == f"residual_layernorm@{op.name}" else f"layernorm@{op.name}"
        if not x.per_tensor or x.mask is not None:
            x = self.align(x, self.wide_scale(x_value.name, (x,)), unit, f"LayerNorm '{op.name}'")
        out = graph.outputs_of(op)[0]
        scale, dtype = self.out_scale(out), INT8
        if self.residual_bits == 16 and scale.ndim == 0:
            scale, dtype = self.int16_scale(out.name), INT16   # the residual stream
        step = LayerNormInt(x.name, float(x.scale), str(x.dtype),
                            tuple(float(g) for g in gamma.numpy().reshape(-1)),
                            None if beta is None else tuple(float(v) for v in beta.numpy().reshape(-1)),
                            float(op.attr("epsilon", 1e-5)), _scale_field(scale), unit=unit, out_dtype=str(dtype))
        name = self.emit(step)
        self.forms[out.name] = _Form(name, dtype, scale, unit)

    def gelu(self, op: Op) -> None:
        graph = self.graph
        if op.op_type == "Gelu":
            block, x_value, out = [op], graph.inputs_of(op)[0], graph.outputs_of(op)[0]
        else:
            block = next(b for b in self.roles.blocks[Role.GELU] if op in b)
            x_value, out = _gelu_block_io(graph, block)
        x = self.form(x_value)
        unit = f"gelu@{block[0].name}"
        x = self.align(x, self.wide_scale(x_value.name, (x,)), unit, f"GELU '{block[0].name}'")
        scale, dtype = self.out_scale(out), INT8
        if self.rotate and scale.ndim == 0 and self.wide_for_linears(out):
            # int16 into the Hadamard transform; one int8 requantization after it
            scale, dtype = self.int16_scale(out.name), INT16
        name = self.emit(GeluInt(x.name, float(x.scale), _scale_field(scale), unit=unit, out_dtype=str(dtype)))
        self.forms[out.name] = _Form(name, dtype, scale, unit)
        for member in block:
            if member is not op:
                self.done.add(member)
                self.lowered.append(member)


def _hadamard_block(channels: int) -> int:
    """The online Walsh-Hadamard block for `channels`: its largest power-of-two divisor, capped."""
    return min(channels & -channels, HADAMARD_MAX_BLOCK) if channels > 0 else 1


def _with_rotations(graph: Graph, names: Iterable[str]) -> Graph:
    """`graph` plus a float x @ blockdiag(H_b) for every requested f"{x}{ROTATED}{b}" name, so
    the calibration run measures the ranges of the rotated tensors the datapath requantizes."""
    wanted = [n for n in names if ROTATED in n]
    if not wanted:
        return graph
    graph = graph.clone()
    for name in wanted:
        source, block = name.rsplit(ROTATED, 1)
        x = graph.value(source)
        channels = int(x.shape[-1])
        matrix = np.kron(np.eye(channels // int(block)), sylvester(int(block))).astype(np.float32)
        graph.add_op("MatMul", [x, graph.add_constant(f"{source}_hadamard", matrix)], [name])
    return graph


def _gelu_block_io(graph: Graph, block: list[Op]) -> tuple[Value, Value]:
    """(x, output) of a GELU block, after checking numerically that it computes GELU(x)."""
    produced = {id(v) for op in block for v in graph.outputs_of(op) if v is not None}
    externals = {v.name: v for op in block for v in graph.inputs_of(op)
                 if v is not None and id(v) not in produced and not graph.is_const(v)}
    ends = [v for op in block for v in graph.outputs_of(op)
            if v is not None and (graph.is_graph_output(v) or any(r not in block for r in graph.consumers(v)))]
    if len(externals) != 1 or len(ends) != 1:
        raise OptionError(f"GELU block at '{block[0].name}' does not have one input and one output")
    (x,) = externals.values()
    (out,) = ends
    probe = np.linspace(-6.0, 6.0, 49)
    values = {x.name: probe}
    unary = {"Erf": np.vectorize(math.erf), "Tanh": np.tanh, "Sqrt": np.sqrt}
    binary = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power}
    for member in graph.topo_order():
        if member not in block:
            continue
        args = [values[v.name] if v.name in values else graph.constant(v).numpy().astype(np.float64)
                for v in graph.inputs_of(member)]
        if member.op_type in unary:
            result = unary[member.op_type](args[0])
        elif member.op_type in binary and len(args) == 2:
            result = binary[member.op_type](*args)
        else:
            raise OptionError(f"GELU block op {member.op_type} '{member.name}' is not supported")
        values[graph.outputs_of(member)[0].name] = result
    exact = 0.5 * probe * (1.0 + np.vectorize(math.erf)(probe / math.sqrt(2.0)))
    if not np.allclose(values[out.name], exact, atol=2e-3):
        raise OptionError(f"the block at '{block[0].name}' is not GELU(x)")
    return x, out


def _pow2_weight(w: np.ndarray, spec: QSpec) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric power-of-two weight quantization along the output channels (last axis of a
    MatMul's [K, N]): per channel, the scale that covers the channel's max (2^k) or the next
    smaller one (2^(k-1), clipping the largest entries), whichever has the smaller squared
    error. Returns (int8 weights, float64 scales of shape (N,) or ())."""
    axis = 1 if spec.granularity == Granularity.CHANNEL else None
    candidates = []
    for clip in (1.0, 0.5):
        q, scale, _ = quantize_weight(w, spec, channel_axis=1, clip_ratio=clip)
        error = (q.astype(np.float64) * scale.astype(np.float64) - w) ** 2
        candidates.append((q, scale.astype(np.float64), error.sum(axis=0) if axis is not None else error.sum()))
    (q1, s1, e1), (q2, s2, e2) = candidates
    pick = e2 < e1
    q = np.where(pick, q2, q1) if axis is not None else (q2 if pick else q1)
    scale = np.where(pick, s2, s1) if axis is not None else (s2 if pick else s1)
    return q.astype(np.int8), np.asarray(scale, np.float64)


# ---- splicing the emitted nodes into the graph -------------------------------------------------


def _splice(graph: Graph, lowering: _Lowering) -> int:
    """Add the builder's initializers and nodes to the graph (names kept), tag each node with
    its unit, point the graph outputs at the dequantized values. Returns the outputs replaced."""
    b, program = lowering.b, lowering.program
    for proto in b.initializers:
        value = graph.add_constant(proto.name, Tensor.from_array(numpy_helper.to_array(proto)))
        if value.name != proto.name:
            raise OptionError(f"integer constant {proto.name!r} collides with a graph value")
    unit_of = {}
    for step, (start, end) in zip(program.steps, program.spans):
        for i in range(start, end):
            unit_of[i] = step.unit
    for i, node in enumerate(b.nodes):
        ins = [graph.value(n) if n else None for n in node.input]
        op = graph.add_op(node.op_type, ins, list(node.output), name=node.name)
        for attr in node.attribute:
            op.attributes[attr.name] = attr
        if unit_of.get(i):
            op.metadata_props = ((UNIT_KEY, unit_of[i]),)
        for out in graph.outputs_of(op):
            if out.name not in node.output:
                raise OptionError(f"integer value {out.name!r} collides with a graph value")
            out.set_type(onnx.helper.np_dtype_to_tensor_dtype(b.dtype(out.name)), None)
    for float_value, name in lowering.outputs:
        new = graph.value(name)
        new.type = float_value.type
        graph.replace_all_uses(float_value, new)
        graph.rename_value(float_value, graph.unique_name(f"{float_value.name}_float"))
        graph.rename_value(new, _original_name(lowering.program, name))
    return len(lowering.outputs)


def _original_name(program: IntegerProgram, name: str) -> str:
    return next(graph_name for out, graph_name in program.outputs if out == name)


def _raise_opset(graph: Graph, host: set[Op]) -> None:
    """The integer kernels are opset 21; the host ops that stay must mean the same there."""
    imports = graph.model.opset_imports
    key = "" if "" in imports or "ai.onnx" not in imports else "ai.onnx"
    old = imports.get(key, 21)
    if old < 21:
        for op in host:
            if op.domain:
                continue
            try:
                before, after = onnx.defs.get_schema(op.op_type, old), onnx.defs.get_schema(op.op_type, 21)
            except onnx.defs.SchemaError:
                continue
            # Later versions mostly add types; a changed input or attribute list changes meaning
            # (e.g. axes moving from an attribute to an input).
            if _signature(before) != _signature(after):
                raise OptionError(f"host op {op.op_type} '{op.name}' changes meaning between opset {old} and 21",
                                  fix="re-export the model at opset 21")
    imports[key] = max(old, 21)
    graph.model.ir_version = max(graph.model.ir_version, 10)


def _signature(schema) -> tuple:
    return tuple(i.name for i in schema.inputs), tuple(sorted(schema.attributes))


def _set_metadata(graph: Graph, entries: dict[str, str]) -> None:
    kept = [(k, v) for k, v in graph.model.metadata_props if k not in entries]
    graph.model.metadata_props = kept + list(entries.items())


def _sample_shapes(ctx: PassContext) -> dict[str, list[int]]:
    """Input shapes of the first calibration sample (what the FPGA estimate assumes by default)."""
    data = ctx.artifacts.get(CALIBRATION_DATA)
    if data is None:
        return {}
    for feed in data:
        return {name: [int(d) for d in np.shape(array)] for name, array in feed.items()}
    return {}
