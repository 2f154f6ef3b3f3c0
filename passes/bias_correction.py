"""Empirical bias correction (Nagel et al., "Data-Free Quantization", 2019; AIMET's bias
correction): the rounding of a Conv's or Gemm's weights shifts the mean of each output channel by
E[x] . (W_q - W); the bias absorbs that shift.

For every Conv and Gemm the plan quantizes, with the weights as insert-qdq will store them (those
GPTQ rounded, else round-to-nearest per the plan's spec), the correction per output channel o is
sum over its input channels c and kernel taps of (W_q - W)[o, c, taps] * mean(x_c), with the
means of the layer inputs measured on the float graph over the calibration data; a Conv or Gemm
without a bias gets one. Border taps of a padded Conv see zeros, so the correction is exact in
the interior and approximate at the edges. Weight-only rounding errors that average out are left
alone; the mean shift accumulates through a CNN (PP-OCRv4 det, int8 per-channel weights: the
global-average-pool inputs of its SE blocks and the detection map carry it).

Runs after calibrate (and gptq), before insert-qdq; does nothing without calibration data.
"""

from __future__ import annotations

import numpy as np
from edgeq.passes.insert_qdq import weight_key

from edgeq.calibration.layer_inputs import ActivationStream, channel_means
from edgeq.ir import Graph, Op
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.pipeline.artifacts import CALIBRATION_DATA, QUANT_PLAN, WEIGHT_ROUNDING
from edgeq.quant.numerics import dequantize, quantize_weight
from edgeq.quant.plan import QuantPlan
from edgeq.registry import register_pass


@register_pass
class BiasCorrection(Pass):
    name = "bias-correction"
    description = "shift Conv/Gemm biases by the mean output change their weights' rounding causes"

    def __init__(self, threads: int = 0, target=None):
        """`target`: where a layer has no bias yet, its rule's bias spec quantizes the new one
        (without it such layers are left alone)."""
        self.threads = threads
        self.target = target

    @classmethod
    def from_options(cls, options, target) -> "BiasCorrection":
        return cls(threads=options.threads, target=target)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        data = ctx.artifacts.get(CALIBRATION_DATA)
        plan: QuantPlan = ctx.artifact(QUANT_PLAN, self.name)
        layers = [p for p in plan.ops if _corrects(graph, p.op) and 1 in p.weights]
        if data is None or not layers:
            return PassResult(graph, False, {"layers": 0})
        rounding = ctx.artifacts.setdefault(WEIGHT_ROUNDING, {})
        inputs = list(dict.fromkeys(graph.inputs_of(p.op)[0].name for p in layers))
        with ActivationStream(graph, data, self.threads) as stream:
            means = channel_means(stream, inputs)
        shifts = []
        for layer in layers:
            op, spec = layer.op, layer.weights[1]
            weight = graph.inputs_of(op)[1]
            key = weight_key(graph, op, 1, spec)
            if key not in rounding:  # insert-qdq finds the same arrays there
                rounding[key] = quantize_weight(graph.constant(weight).numpy(), spec, key[2])
            error = _weight_error(graph.constant(weight).numpy(), rounding[key], key[2])
            shift = _output_shift(op, error, means[graph.inputs_of(op)[0].name])
            if shift is None:
                continue
            if layer.bias is None:  # a new bias: quantized as the target quantizes this op's biases
                rule = self.target.rule(op.kind) if self.target is not None else None
                if rule is None or rule.bias is None:
                    continue
                layer.bias = rule.bias
            _subtract_from_bias(graph, op, shift)
            shifts.append(float(np.abs(shift).mean()))
        return PassResult(graph, bool(shifts), {"layers": len(shifts),
                                                "mean_abs_shift": round(float(np.mean(shifts)), 6) if shifts else 0})


def _corrects(graph: Graph, op: Op) -> bool:
    ins = graph.inputs_of(op)
    if op.domain or op.op_type not in ("Conv", "Gemm") or len(ins) < 2 or not graph.is_const(ins[1]):
        return False
    if op.op_type == "Conv":
        return True
    plain = not op.attr("transA", 0) and op.attr("alpha", 1.0) == 1.0 and op.attr("beta", 1.0) == 1.0
    return plain and len(graph.constant(ins[1]).dims) == 2


def _weight_error(weight: np.ndarray, quantized: tuple, channel_axis: int) -> np.ndarray:
    """W_q - W in float64, the quantized arrays as quantize_weight returns them."""
    q, scale, zero = quantized
    scale, zero = np.asarray(scale), np.asarray(zero)
    if scale.ndim == 1 and scale.size > 1:  # per channel
        shape = [1] * weight.ndim
        shape[channel_axis % weight.ndim] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return dequantize(np.asarray(q), scale, zero).astype(np.float64) - weight.astype(np.float64)


def _output_shift(op: Op, error: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """E[y_q - y] per output channel for input channel means `mean`."""
    if op.op_type == "Gemm":
        return mean @ (error.T if op.attr("transB", 0) else error)
    outputs, per_group = error.shape[0], error.shape[1]
    groups = int(op.attr("group", 1))
    if per_group * groups != mean.size:
        return None
    taps = error.reshape(outputs, per_group, -1).sum(axis=2)                      # [O, C/g]
    group_of = np.arange(outputs) // (outputs // groups)
    inputs = mean.reshape(groups, per_group)[group_of]                           # [O, C/g]
    return (taps * inputs).sum(axis=1)


def _subtract_from_bias(graph: Graph, op: Op, shift: np.ndarray) -> None:
    ins = graph.inputs_of(op)
    bias = graph.constant(ins[2]).numpy().astype(np.float64) if len(ins) > 2 and ins[2] is not None else 0.0
    corrected = (bias - shift).astype(np.float32)
    graph.set_input(op, 2, graph.add_constant(graph.unique_name(f"{op.name}_bias_corrected"), corrected))
