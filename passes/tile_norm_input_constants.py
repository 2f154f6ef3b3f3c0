"""Tile a constant that broadcasts over the batch (or sequence) axis of an elementwise op feeding a norm.

QNN's HTP (qnn-htp, simulator v73, QNN SDK 2.51) computes `LayerNormalization(Add(x, c))` wrongly
when `c` is a constant that varies along a non-channel axis but broadcasts over another: BERT's
position embeddings `[1, S, H]` added to `[2, S, H]` token embeddings give the right first row
and up to 18,114 LSB of error (of 65,535) on the second; `Mul` is as wrong (32,768 LSB), RMS norms
read the same fused pattern. A per-channel constant `[H]` or `[1, 1, H]`, a constant of the full
shape, or any other consumer (Mul, Sigmoid) are exact. Giving the op its constant at the full
output shape avoids the fused broadcast: the constant grows by the broadcast factor only (the
batch size, for position embeddings), and only on static-shape graphs.
"""

from __future__ import annotations

import numpy as np

from edgeq.ir import Graph, Op
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.registry import register_pass

_NORMS = frozenset({"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"})
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div"})


@register_pass
class TileNormInputConstants(Pass):
    name = "tile-norm-input-constants"
    description = "give an elementwise op feeding a norm its broadcast constant at the full (static) shape"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        tiled = 0
        for op in list(graph.topo_order()):
            if op.op_type in _ELEMENTWISE and not op.domain and _feeds_norm(graph, op):
                tiled += _tile_constant_operand(graph, op)
        return PassResult(graph, tiled > 0, {"constants_tiled": tiled})


def _feeds_norm(graph: Graph, op: Op) -> bool:
    output = graph.outputs_of(op)[0]
    return any(consumer.op_type in _NORMS and graph.inputs_of(consumer)[0] is output
               for consumer in graph.consumers(output))


def _tile_constant_operand(graph: Graph, op: Op) -> int:
    shape = _static_shape(graph, op)
    if shape is None:
        return 0  # dynamic shapes: nothing to tile to
    tiled = 0
    for slot, value in enumerate(graph.inputs_of(op)[:2]):
        tensor = graph.constant(value) if value is not None else None
        if tensor is None:
            continue
        array = tensor.numpy()
        padded = (1,) * (len(shape) - array.ndim) + array.shape
        if len(padded) != len(shape) or not _broadcast_breaks_fusion(padded, shape):
            continue
        full = np.ascontiguousarray(np.broadcast_to(array.reshape(padded), shape))
        graph.set_input(op, slot, graph.add_constant(graph.unique_name(f"{value.name}_tiled"), full))
        tiled += 1
    return tiled


def _static_shape(graph: Graph, op: Op) -> tuple[int, ...] | None:
    """The op's output shape: recorded, else the broadcast of its inputs' static shapes."""
    recorded = graph.outputs_of(op)[0].shape
    if recorded and all(isinstance(d, int) for d in recorded):
        return tuple(recorded)
    shapes = []
    for value in graph.inputs_of(op)[:2]:
        tensor = graph.constant(value) if value is not None else None
        shape = tensor.shape if tensor is not None else (value.shape if value is not None else None)
        if shape is None or any(not isinstance(d, int) for d in shape):
            return None
        shapes.append(tuple(shape))
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        return None


def _broadcast_breaks_fusion(constant: tuple[int, ...], full: tuple[int, ...]) -> bool:
    """True where the constant broadcasts over some axis and also varies along an axis other than
    the last (the channel axis the norm reduces): `[1, S, H]` or `[S, H]` on `[B, S, H]` with B > 1.
    A per-channel `[1, 1, H]` broadcast is exact on the HTP and stays as it is."""
    broadcasts = any(c == 1 and f > 1 for c, f in zip(constant, full))
    varies_off_channel = any(c > 1 for c in constant[:-1])
    return broadcasts and varies_off_channel
