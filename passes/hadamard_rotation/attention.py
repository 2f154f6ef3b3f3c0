"""Attention structure for the Hadamard rotation: whether a linear reads an attention context
(`reads_attention`), the value path from o_proj back to the V projection along which a per-head
rotation commutes with everything (`match_value_path`), and the q/k score MatMuls that take an
online per-head Hadamard (`score_matmuls`, `qk_head_dim`)."""

from __future__ import annotations

import numpy as np

from edgeq.frontend.patterns import DATA_MOVEMENT
from edgeq.ir import Graph, Op, Value
from edgeq.passes.hadamard_rotation.structure import Linear, Refuse, as_linear, with_bias_add
from edgeq.quant.hadamard import factor_orders
from edgeq.quant.sharing import is_owned_by_match


def reads_attention(graph: Graph, x: Value) -> bool:
    """x is an attention context: data movement back to a MatMul of two activations."""
    value = x
    while True:
        producer = graph.producer(value)
        if producer is None:
            return False
        if producer.op_type in DATA_MOVEMENT and not producer.domain:
            value = graph.inputs_of(producer)[0]
            continue
        ins = graph.inputs_of(producer)
        return producer.op_type == "MatMul" and not any(graph.is_const(i) for i in ins)


def _single_reader(graph: Graph, value: Value, reader: Op) -> None:
    if not is_owned_by_match(graph, value, [reader]):
        raise Refuse(f"{value.name!r} is read by more than the attention value path")


def match_value_path(graph: Graph, context: Value, o_proj: Op, caches: list[Op] | None = None) -> tuple[Linear, int]:
    """From o_proj's input back to the value projection: data movement, the attention
    MatMul(probs, V), data movement, the V linear [+ bias]. Returns (V linear, head_dim) when a
    per-head rotation of V's last axis commutes with everything on the path.

    With `caches` (a list to fill), a KV cache on the path, `present = Concat(past input, new,
    axis=2)` written as a graph output, is passed and its Concat appended: the caller keeps the
    cache in the unrotated basis (the new values rotated back before the Concat, the attention
    output rotated after it), so the cache inputs and outputs do not change."""
    after: list[Op] = []          # movement ops between the attention MatMul and o_proj
    value, reader = context, o_proj
    while True:
        _single_reader(graph, value, reader)
        producer = graph.producer(value)
        if producer is None:
            raise Refuse("attention path starts at a graph input")
        if producer.op_type == "MatMul":
            break
        if producer.op_type not in DATA_MOVEMENT or producer.domain:
            raise Refuse(f"{producer.op_type} {producer.name!r} between attention and o_proj")
        after.append(producer)
        value, reader = graph.inputs_of(producer)[0], producer
    attention = producer
    probs, v = graph.inputs_of(attention)
    if graph.is_const(probs) or graph.is_const(v) or probs is v:
        raise Refuse(f"{attention.name!r} is not probs x V")
    before: list[Op] = []
    value, reader = v, attention
    while True:
        producer = graph.producer(value)
        if caches is not None and producer is not None and _is_cache_concat(graph, producer):
            caches.append(producer)
            value, reader = graph.inputs_of(producer)[1], producer
            continue
        _single_reader(graph, value, reader)
        if producer is None:
            raise Refuse("V comes from a graph input (a cache?)")
        if producer.op_type == "Concat":
            raise Refuse("V is concatenated with a cache input; rotating it would change the cache outputs")
        if producer.op_type in ("MatMul", "Add"):
            break
        if producer.op_type not in DATA_MOVEMENT or producer.domain:
            raise Refuse(f"{producer.op_type} {producer.name!r} on the value path")
        before.append(producer)
        value, reader = graph.inputs_of(producer)[0], producer
    if producer.op_type == "Add":
        ins = graph.inputs_of(producer)
        bias = next((i for i in ins if i is not None and i.const is not None), None)
        data = next((i for i in ins if i is not bias), None)
        if bias is None or data is None or graph.producer(data) is None:
            raise Refuse("value path starts at an Add that is not a bias")
        linear = as_linear(graph, graph.producer(data))
        if linear is None:
            raise Refuse("V is not a linear layer's output")
        linear = with_bias_add(graph, linear, linear.weight.const.dims[1])
        if linear.bias_op is not producer:
            raise Refuse("V's bias Add is shared")
    else:
        linear = as_linear(graph, producer)
        if linear is None:
            raise Refuse("V is not a linear layer's output")
    head_dim = _last_dim(graph, v)
    if head_dim is None:
        raise Refuse("head dimension unknown")
    width = linear.weight.const.dims[1]
    for op in reversed(before):   # forward order: V linear -> attention
        width = _check_movement(graph, op, width, head_dim)
    if width != head_dim:
        raise Refuse(f"V reaches attention with last dim {width}, not the head dim {head_dim}")
    for op in reversed(after):    # forward order: attention -> o_proj
        width = _check_movement(graph, op, width, head_dim)
    rows = graph.inputs_of(o_proj)[1].const.dims[0]
    if width != rows or rows % head_dim:
        raise Refuse(f"o_proj reads {rows} channels, the merged heads have {width}")
    return linear, head_dim


def _is_cache_concat(graph: Graph, op: Op) -> bool:
    """present = Concat(past graph input, new, axis=2), a graph output (read by attention too)."""
    ins = graph.inputs_of(op)
    return (op.op_type == "Concat" and not op.domain and len(ins) == 2 and op.attr("axis") in (2, -2)
            and any(ins[0] is v for v in graph.inputs) and graph.is_graph_output(graph.outputs_of(op)[0]))


def _last_dim(graph: Graph, value: Value) -> int | None:
    shape = value.shape
    if shape and isinstance(shape[-1], int) and shape[-1] > 0:
        return shape[-1]
    return None


def _check_movement(graph: Graph, op: Op, width: int, block: int) -> int:
    """The last-axis width after `op`, if `op` keeps blocks of `block` channels of the last axis
    together (so a block-diagonal rotation of the last axis commutes with it); else Refuse."""
    ins = graph.inputs_of(op)
    out = graph.outputs_of(op)[0]
    if op.op_type == "Identity":
        return width
    if op.op_type == "Transpose":
        perm = op.attr("perm")
        if perm is None or perm[-1] != len(perm) - 1:
            raise Refuse(f"{op.name!r} moves the last axis")
        return width
    if op.op_type == "Reshape":
        target = graph.constant(ins[1])
        if target is None:
            raise Refuse(f"{op.name!r} has a computed shape")
        last = int(np.asarray(target.numpy()).ravel()[-1])
        if last <= 0:
            last = _last_dim(graph, out) or 0
        if last <= 0 or width % block or last % block:
            raise Refuse(f"{op.name!r} splits the last axis across the head blocks")
        return last
    if op.op_type in ("Unsqueeze", "Squeeze"):
        axes = op.attr("axes")
        if axes is None and len(ins) > 1 and ins[1] is not None:
            tensor = graph.constant(ins[1])
            axes = None if tensor is None else [int(a) for a in np.asarray(tensor.numpy()).ravel()]
        rank = len(out.shape) if op.op_type == "Unsqueeze" and out.shape is not None else (
            len(ins[0].shape) if ins[0].shape is not None else None)
        if axes is None or rank is None or any(a == -1 or a == rank - 1 for a in axes):
            raise Refuse(f"{op.name!r} may touch the last axis")
        return width
    if op.op_type == "Expand":
        shape = graph.constant(ins[1])
        if shape is None or int(np.asarray(shape.numpy()).ravel()[-1]) not in (1, width):
            raise Refuse(f"{op.name!r} expands the last axis")
        return width
    raise Refuse(f"{op.op_type} {op.name!r} on the attention value path")


def score_matmuls(graph: Graph) -> list[Op]:
    """MatMul(q, k^T) of two activations whose output reaches a Softmax through scaling,
    masking and adding only."""
    found = []
    for op in graph.ops_of_type("MatMul"):
        ins = graph.inputs_of(op)
        if op.domain or len(ins) != 2 or any(v is None or graph.is_const(v) for v in ins):
            continue
        value = graph.outputs_of(op)[0]
        for _ in range(4):
            readers = graph.consumers(value)
            if len(readers) != 1:
                break
            reader = readers[0]
            if reader.op_type == "Softmax":
                found.append(op)
                break
            if reader.op_type not in ("Mul", "Div", "Add", "Where"):
                break
            value = graph.outputs_of(reader)[0]
    return found


def qk_head_dim(graph: Graph, op: Op) -> int:
    q, kt = graph.inputs_of(op)
    head_dim = _last_dim(graph, q)
    k_shape = kt.shape
    if head_dim is None or k_shape is None or len(k_shape) < 2 or k_shape[-2] != head_dim:
        raise Refuse("head dimension of q/k unknown")
    factor_orders(head_dim)   # raises HadamardOrderError when there is no Hadamard matrix
    return head_dim
