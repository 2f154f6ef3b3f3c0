"""The linear-layer rule: x @ W (+ bias) as MatMulInteger with power-of-two weights.

W (an initializer, or the Transpose of one: a tied LM head reading the embedding table) is
quantized symmetric per output channel (or per tensor) with power-of-two scales, rounded to
nearest or with GPTQ against the layer input's second moments; a following constant Add becomes
an int32 bias at the accumulator's scale. An input whose channels carry a constant factor the
lowering folded away (an RMSNorm's gamma, Lowering.folded) reads the tensor before the factor,
the factor multiplying W's rows. A wide input with one scale is rotated online
(edgeq.backends.fpga.lowering.rotation), the rotation folded into W; a channel-scaled input is
split into channel groups, one MatMulInteger each, their accumulators shifted and added.
"""

from __future__ import annotations

import math

import numpy as np

from edgeq.backends.fpga.integer.program import AddInt, MatMulInt, Move, Shift
from edgeq.backends.fpga.lowering.forms import INT8, INT32, INT64, UINT8, Form, exponent
from edgeq.backends.fpga.lowering.rotation import hadamard_block, rotated
from edgeq.backends.fpga.lowering.state import Lowering
from edgeq.errors import OptionError
from edgeq.ir import Graph, Op, Value
from edgeq.quant.numerics import quantize_weight
from edgeq.quant.rounding import gptq_quantize
from edgeq.targets.base import Granularity, QSpec

GPTQ_DAMPING = 0.01   # GPTQ's: 1% of the Hessian's mean diagonal


def linear(lowering: Lowering, op: Op) -> None:
    """x [..., K] @ W [K, N] (+ bias) -> an int32/int64 accumulator with one power-of-two
    scale per output channel. W is quantized per output channel (powers of two). When x
    has per-channel scales s * 2^-k_c, the channels are grouped by k, each group is one
    MatMulInteger, and the group accumulators are added after a left shift by kmax - k:
    x's channel scales cost shifts of partial sums, never weight precision."""
    graph, b = lowering.graph, lowering.b
    x_value, w_value = graph.inputs_of(op)
    x_name = x_value.name
    w = constant_weight(graph, w_value).astype(np.float32)
    if x_name in lowering.folded:   # x = factor * t per input channel: x W = t (diag(factor) W)
        x_name, factor = lowering.folded[x_name]
        w = (factor[:, None] * w.astype(np.float64)).astype(np.float32)
    x = lowering.forms[x_name]
    if w.ndim != 2:
        raise OptionError(f"MatMul '{op.name}': weight of rank {w.ndim}; the fpga lowering takes [K, N] weights")
    moment = lowering.ranges.second_moment(x_name)
    rotation = None
    if x.dtype not in (INT8, UINT8) and x.per_tensor and lowering.options.rotate and hadamard_block(w.shape[0]) > 1:
        x, rotation = rotated(lowering, x_name, w.shape[0])
        # x W = (x H)(H^T W) / b with H H^T = b I: the rotation and its 1/b fold into the
        # float weights before they are quantized (Q = H / sqrt(b) orthogonal)
        root = math.sqrt(rotation.block_order)
        w = (rotation.apply(w.astype(np.float64), 0) / root).astype(np.float32)
        if moment is not None:
            moment = rotation.apply(rotation.apply(moment, 0), 1) * rotation.block_order
    elif x.dtype not in (INT8, UINT8):
        x = lowering.int8(x_name)
    weight_spec = lowering.options.weight_for(op.name)
    if moment is None:
        q, w_scale = pow2_weight(w, weight_spec)
    else:  # GPTQ against the second moments of the layer's input
        q, scale, _ = gptq_quantize(w, moment, weight_spec, damp=GPTQ_DAMPING, clip_ratios=(1.0, 0.5))
        q, w_scale = q.astype(np.int8), np.asarray(scale, np.float64)
    x_scale = float(np.max(x.scale))
    shifts = np.zeros(w.shape[0], np.int64) if x.per_tensor else np.asarray(
        [-exponent(np.asarray(r), f"input channels of '{op.name}'") for r in x.scale / x_scale], np.int64)
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
            lowering.mark_lowered(add)
            result = graph.outputs_of(add)[0]
    unit = f"linear@{op.name}"
    groups = sorted(set(shifts.tolist()), reverse=True)  # finest first: it takes the bias
    if len(groups) == 1:
        bias_name = None if bias is None else b.const(bias.astype(np.int32), INT32, "bias")
        name = lowering.emit(MatMulInt(x.name, b.const(q, INT8, "weight"), bias_name, unit=unit))
        lowering.forms[result.name] = Form(name, INT32, np.asarray(acc_scale, np.float64), unit)
        return
    total = None
    for k in groups:
        rows = np.flatnonzero(shifts == k)
        part = channels(lowering, x, rows)
        bias_name = None if bias is None or total is not None else b.const(bias.astype(np.int32), INT32, "bias")
        acc = lowering.emit(MatMulInt(part, b.const(q[rows], INT8, "weight"), bias_name, unit=unit))
        acc = lowering.emit(Shift(acc, finest - k, "int64", unit=unit))
        total = acc if total is None else lowering.emit(AddInt(total, acc, "int64", unit=unit))
    lowering.forms[result.name] = Form(total, INT64, np.asarray(acc_scale, np.float64), unit)


def constant_weight(graph: Graph, value: Value) -> np.ndarray | None:
    """The constant [K, N] weight behind a MatMul's second input: an initializer, or the
    Transpose of one (a tied LM head reading the [V, C] embedding table as W = E^T); else None."""
    const = graph.constant(value)
    if const is not None:
        return const.numpy()
    producer = graph.producer(value)
    if producer is None or producer.op_type != "Transpose" or producer.domain:
        return None
    source = graph.constant(graph.inputs_of(producer)[0])
    if source is None or source.numpy().ndim != 2 or list(producer.attr("perm", [1, 0])) != [1, 0]:
        return None
    return source.numpy().T


def channels(lowering: Lowering, x: Form, rows: np.ndarray) -> str:
    """x's last-axis channels `rows` (a Gather, shared by the linears reading x)."""
    key = (x.name, rows.tobytes())
    if key not in lowering.gathered:
        lowering.gathered[key] = lowering.emit(Move(x.name, "Gather", indices=tuple(int(r) for r in rows)))
    return lowering.gathered[key]


def pow2_weight(w: np.ndarray, spec: QSpec) -> tuple[np.ndarray, np.ndarray]:
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
