"""Lower a calibrated transformer encoder or decoder to an integer-only datapath (the `fpga` target).

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

Llama-style decoders (the front end's canonical forms; rules in edgeq.backends.fpga.lowering:
rmsnorm, silu, products, rotary, host, gqa, masks) reuse all of the above, plus:
- pre-norm residual stream: the embedding sum enters as above; every residual add's int32 sum
  (WIDE_BITS below its bound) feeds both the next add and the next RMSNorm, which reads int32;
- RMSNorm: the integer RMSNorm (exact isqrt, block floating point); when only linear layers read
  it, gamma folds into their weights and the norm emits x / rms(x), int16 into the Hadamard
  transform (QuaRot's fold: no gamma outlier channels in any activation);
- SiLU: i-exp sigmoid times x; SwiGLU's Mul(silu(gate), up): an exact integer product of 16-bit
  operands, read by down_proj through the Hadamard transform;
- rotary: cos/sin depend on the positions only, so the host computes them (listed host ops) and
  they enter quantized to int8; rotate_half is Slice/Concat on integers and a negation into int16
  (exact for -128); x * cos + rotate_half(x) * sin are exact integer products and one add;
- GQA's repeat of K/V heads: Unsqueeze/Expand/Reshape on int8;
- causal (+ padding) mask: integer compares of key and query positions (T from the attention
  mask, S from the ids, found by evaluating the float mask's subgraph on probe shapes), each
  masked term -2^30 in int32; dynamic batch and sequence kept;
- LM head: a linear layer, also when its weight is the Transpose of the embedding table;
  logits leave as int8 through the one DequantizeLinear.

Scales come from calibration: int8 tensors use the configured range method (percentile 99.999
by default) of the float tensor they stand for, rounded up to a power of two
(`edgeq.quant.numerics.qparams` with `scale_pow2`); int32 grids use the min/max bound and keep
WIDE_BITS bits below it (7 bits of headroom in int32). Ranges the `calibrate` pass already
collected are reused; the rest are collected with `edgeq.calibration.collection.calibrate` on the float
graph in one run.

The datapath is also recorded as an `edgeq.backends.fpga.integer.program.IntegerProgram` in the model's
metadata (`edgeq.integer.program`): its numpy reference is the bit-exact functional model
that ONNX Runtime's execution of the graph must match. Host ops are listed in
`edgeq.host_ops`, the calibration samples' input shapes in `edgeq.fpga.input_shapes`, and
every emitted node carries `edgeq.unit` (kind@instance) for the FPGA estimator (the keys are
defined in edgeq.backends.fpga.metadata).

This module holds the pass: its options and the order of the steps. How each step is done lives
in edgeq.backends.fpga.lowering (ranges, scale choice, one module per family of rules, splicing).
"""

from __future__ import annotations

import onnx

from edgeq.backends.fpga.lowering.driver import lower_datapath
from edgeq.backends.fpga.lowering.options import LoweringOptions
from edgeq.backends.fpga.lowering.ranges import RangeRequests, calibrated_ranges, second_moments
from edgeq.backends.fpga.lowering.splice import raise_opset, record_metadata, splice
from edgeq.backends.fpga.lowering.state import Lowering
from edgeq.errors import OptionError, PostconditionError, PreconditionError
from edgeq.ir import Graph
from edgeq.options import CalibrationOptions
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.pipeline.artifacts import CALIBRATION_DATA, CALIBRATION_STATISTICS, INTEGER_PROGRAM, QUANT_PLAN
from edgeq.quant.budget import LATENCY_BUDGET
from edgeq.quant.plan import OpPlan
from edgeq.registry import register_pass
from edgeq.targets.base import Granularity, QSpec

FIRST_NORM = ("integer", "host")
SCALE_CHOICES = ("mse", "cover")
WEIGHT_ROUNDING = ("gptq", "nearest")


@register_pass
class LowerToInteger(Pass):
    name = "lower-to-integer"
    description = ("lower a calibrated transformer encoder or decoder to an integer-only datapath: MatMulInteger, "
                   "shift requantization, integer softmax/LayerNorm/RMSNorm/GELU/SiLU (power-of-two scales)")

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
            raise PreconditionError("lower-to-integer needs a target in the pass context")

    def ensures(self, graph: Graph, ctx: PassContext) -> None:
        """Per-tensor activations (equalization=None): no tensor of the datapath has channel
        scales, and every multiplier input is 8 bits wide."""
        program = ctx.artifacts.get(INTEGER_PROGRAM)
        if program is None or self.equalization is not None:
            return
        if program.channel_scaled():
            raise PostconditionError("lower-to-integer left per-channel activation scales: "
                                     f"{program.channel_scaled()[0]}")
        for op in graph.topo_order():
            if op.op_type == "MatMulInteger":
                wide = [v.name for v in graph.inputs_of(op)[:2]
                        if v.elem_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)]
                if wide:
                    raise PostconditionError(f"MatMulInteger '{op.name}' reads {wide[0]}, which is not 8-bit")

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

    def _options(self, ctx: PassContext) -> LoweringOptions:
        act, weight = self._specs(ctx)
        return LoweringOptions(act, weight, self.first_norm, self.equalization, self.max_channel_shift,
                               self.probability_bits, self.residual_bits, self.rotate, self.scale_choice,
                               self._chosen_widths(ctx, weight))

    @staticmethod
    def _chosen_widths(ctx: PassContext, weight: QSpec) -> dict[str, QSpec]:
        """Where --latency-budget chose each linear's width on the plan: the lowering's weight
        spec with that width's value range, by op name."""
        plan = ctx.artifacts.get(QUANT_PLAN)
        if ctx.artifacts.get(LATENCY_BUDGET) is None or plan is None:
            return {}
        return {p.op.name: weight.replace(qrange=p.weights[1].qrange) for p in plan.ops if 1 in p.weights}

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        options = self._options(ctx)
        data = ctx.artifacts.get(CALIBRATION_DATA)
        # 1. Which float tensors need ranges: a dry run of the lowering records its requests.
        requests = RangeRequests(graph)
        lower_datapath(graph, options, requests)
        # 2. Their statistics: reuse the calibrate pass's, collect the rest in one run.
        ranges = calibrated_ranges(graph, requests.names, ctx.artifacts.get(CALIBRATION_STATISTICS), data,
                                   self.calibration, self.threads)
        if self.weight_rounding == "gptq" and requests.linear_inputs:
            ranges.moments = second_moments(graph, requests.linear_inputs, data, self.threads)
        # 3. The real lowering, spliced into the graph.
        lowering = lower_datapath(graph, options, ranges)
        replaced = splice(graph, lowering)
        raise_opset(graph, lowering.host)
        record_metadata(graph, lowering, data)
        ctx.artifacts[INTEGER_PROGRAM] = lowering.program
        self._update_plan(ctx, lowering)
        census = {}
        for step in lowering.program.steps:
            census[step.kind] = census.get(step.kind, 0) + 1
        stats = {"float_ops_lowered": len(lowering.lowered), "host_ops": len(lowering.host),
                 "outputs_dequantized": replaced, "tensors_calibrated": len(requests.names),
                 **{f"steps_{k}": v for k, v in sorted(census.items())}}
        return PassResult(graph, True, stats)

    @staticmethod
    def _update_plan(ctx: PassContext, lowering: Lowering) -> None:
        """The select-precision plan, if any, now says what actually runs in integer."""
        plan = ctx.artifacts.get(QUANT_PLAN)
        if plan is None:
            return
        plan.ops = [OpPlan(op) for op in lowering.lowered]
        plan.kept_high = list(lowering.host_ops())
