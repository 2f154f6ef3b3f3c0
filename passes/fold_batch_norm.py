"""Fold an inference-mode BatchNormalization away: into the Conv or ConvTranspose that alone feeds
it (weights scaled per output channel, bias shifted), else into a per-channel Mul and Add.

For a target that quantizes every tensor (qnn-htp): QNN's HTP takes no BatchNormalization with
quantized statistics, and exporters leave some unfolded (PP-OCRv4 det: the three of its DB
head, after a Conv and two ConvTransposes). y = x * s + t with s = scale / sqrt(var + eps) and
t = B - mean * s, per channel (axis 1).
"""

from __future__ import annotations

import numpy as np

from edgeq.ir import Graph, Op
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.registry import register_pass


@register_pass
class FoldBatchNorm(Pass):
    name = "fold-batch-norm"
    description = "fold inference BatchNormalization into the Conv/ConvTranspose before it, else a Mul and Add"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        into_conv = affine = 0
        for op in list(graph.topo_order()):
            if op.op_type != "BatchNormalization" or op.domain or op.attr("training_mode", 0):
                continue
            params = _params(graph, op)
            if params is None:
                continue
            if _fold_into_producer(graph, op, *params):
                into_conv += 1
            elif _as_affine(graph, op, *params):
                affine += 1
        return PassResult(graph, bool(into_conv or affine), {"into_conv": into_conv, "as_mul_add": affine})


def _params(graph: Graph, bn: Op) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel (s, t) of y = x * s + t, or None unless every statistic is a constant."""
    ins = graph.inputs_of(bn)
    outs = graph.outputs_of(bn)
    if len(ins) != 5 or any(v is None or not graph.is_const(v) for v in ins[1:]):
        return None
    if any(v is not None and (graph.consumers(v) or graph.is_graph_output(v)) for v in outs[1:]):
        return None
    scale, bias, mean, var = (graph.constant(v).numpy().astype(np.float64) for v in ins[1:])
    s = scale / np.sqrt(var + float(bn.attr("epsilon", 1e-5)))
    return s, bias - mean * s


def _fold_into_producer(graph: Graph, bn: Op, s: np.ndarray, t: np.ndarray) -> bool:
    return fold_affine_into_conv(graph, bn, graph.inputs_of(bn)[0], s, t, "bn_folded")


def fold_affine_into_conv(graph: Graph, op: Op, x, s: np.ndarray, t: np.ndarray, suffix: str) -> bool:
    """Fold `op`, which computes x * s + t per output channel (axis 1) of the Conv or
    ConvTranspose producing `x` (its only reader), into that op's weights and bias. The folded
    output keeps `op`'s output name."""
    conv = graph.producer(x)
    if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or conv.domain:
        return False
    if len(graph.consumers(x)) != 1 or graph.is_graph_output(x):
        return False
    ins = graph.inputs_of(conv)
    weight = graph.constant(ins[1]) if len(ins) > 1 and ins[1] is not None else None
    bias = graph.constant(ins[2]) if len(ins) > 2 and ins[2] is not None else None
    if weight is None or (len(ins) > 2 and ins[2] is not None and bias is None):
        return False
    w = weight.numpy()
    group = int(conv.attr("group", 1))
    if conv.op_type == "Conv":
        channels = w.shape[0]
        shape = (channels,) + (1,) * (w.ndim - 1)
        if channels != s.size:
            return False
        folded = w * s.reshape(shape)
    else:  # ConvTranspose: weight [C_in, C_out / group, k...], output channel g * C_out/group + j
        per_group = w.shape[1]
        if per_group * group != s.size:
            return False
        w = w.reshape((group, w.shape[0] // group) + w.shape[1:])
        folded = (w * s.reshape((group, 1, per_group) + (1,) * (w.ndim - 3))).reshape((-1,) + w.shape[2:])
    b = bias.numpy().astype(np.float64) if bias is not None else np.zeros(s.size)
    new_w = graph.add_constant(graph.unique_name(f"{ins[1].name}_{suffix}"), folded.astype(weight.dtype))
    new_b = graph.add_constant(graph.unique_name(f"{conv.name}_bias_{suffix}"), (b * s + t).astype(weight.dtype))
    graph.set_input(conv, 1, new_w)
    graph.set_input(conv, 2, new_b)  # sets or adds the bias slot
    out = graph.outputs_of(op)[0]
    graph.replace_all_uses(out, x)
    name = out.name
    graph.remove_op(op)
    graph.rename_value(x, name)  # the folded output keeps the name its readers knew
    return True


def _as_affine(graph: Graph, bn: Op, s: np.ndarray, t: np.ndarray) -> bool:
    x = graph.inputs_of(bn)[0]
    rank = len(x.shape) if x.shape else None
    if rank is None or rank < 2:
        return False
    dtype = graph.constant(graph.inputs_of(bn)[1]).numpy().dtype
    shape = (s.size,) + (1,) * (rank - 2)
    scale = graph.add_constant(f"{bn.name}_scale", s.reshape(shape).astype(dtype))
    shift = graph.add_constant(f"{bn.name}_shift", t.reshape(shape).astype(dtype))
    out = graph.outputs_of(bn)[0]
    mul = graph.add_op("Mul", [x, scale], [f"{out.name}_scaled"], name=f"{bn.name}/scale", after=bn)
    graph.outputs_of(mul)[0].type = out.type
    add = graph.add_op("Add", [graph.outputs_of(mul)[0], shift], [f"{out.name}_shifted"], name=f"{bn.name}/shift",
                       after=mul)
    last = graph.outputs_of(add)[0]
    last.type = out.type
    graph.take_over(out, last, "bn")
    graph.remove_op(bn)
    return True
