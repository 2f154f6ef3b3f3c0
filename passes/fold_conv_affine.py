"""Fold a per-channel Mul or Add of a constant into the Conv before it.

Exporters write a convolution's scale and shift as separate ops: PaddlePaddle's MobileOne blocks
(`Conv -> Mul(w_0) -> Add(w_1)`, PP-OCRv4 det's 38 of them). Folded, they are the Conv's weights
and bias: exact in float and two fewer quantized tensors per block. A constant folds when it is
a scalar or varies along the output channels only (axis 1), and the Conv's output is read by
this op alone. ConvTranspose is left alone: QNN's HTP computes a ConvTranspose with a bias
wrongly (PP-OCRv4 det's bias Adds folded in: cosine with the CPU run of the same QDQ model 0.19).
"""

from __future__ import annotations

import numpy as np
from edgeq.passes.fold_batch_norm import fold_affine_into_conv

from edgeq.ir import Graph, Op
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.registry import register_pass


@register_pass
class FoldConvAffine(Pass):
    name = "fold-conv-affine"
    description = "fold a per-channel (or scalar) Mul/Add of a constant into the Conv before it"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        scales = shifts = 0
        for op in list(graph.topo_order()):
            if op.op_type not in ("Mul", "Add") or op.domain:
                continue
            found = _conv_and_constant(graph, op)
            if found is None:
                continue
            x, per_channel = found
            one, zero = np.ones_like(per_channel), np.zeros_like(per_channel)
            s, t = (per_channel, zero) if op.op_type == "Mul" else (one, per_channel)
            if fold_affine_into_conv(graph, op, x, s, t, "affine_folded"):
                scales += op.op_type == "Mul"
                shifts += op.op_type == "Add"
        return PassResult(graph, bool(scales or shifts), {"scales_folded": scales, "shifts_folded": shifts})


def _conv_and_constant(graph: Graph, op: Op) -> tuple[object, np.ndarray] | None:
    """(the convolution's output, the constant per output channel) where `op` reads one of each."""
    ins = graph.inputs_of(op)
    if len(ins) != 2 or any(v is None for v in ins):
        return None
    for x, c in ((ins[0], ins[1]), (ins[1], ins[0])):
        conv = graph.producer(x)
        tensor = graph.constant(c)
        if conv is None or conv.op_type != "Conv" or conv.domain or tensor is None:
            continue
        if tensor.dtype.kind != "f" or not x.shape or any(not isinstance(d, int) for d in x.shape):
            return None
        channels = x.shape[1] if len(x.shape) > 1 else None
        per_channel = _per_output_channel(tensor.numpy(), len(x.shape), channels)
        return (x, per_channel) if per_channel is not None else None
    return None


def _per_output_channel(array: np.ndarray, rank: int, channels: int | None) -> np.ndarray | None:
    """The constant as one value per output channel, if it broadcasts onto [N, C, ...] without
    varying along any other axis (and does not widen the output)."""
    if channels is None or array.ndim > rank:
        return None
    padded = array.reshape((1,) * (rank - array.ndim) + array.shape)
    if any(size != 1 for axis, size in enumerate(padded.shape) if axis != 1):
        return None
    if padded.shape[1] not in (1, channels):
        return None
    return np.broadcast_to(padded.reshape(-1).astype(np.float64), (channels,)).copy()
