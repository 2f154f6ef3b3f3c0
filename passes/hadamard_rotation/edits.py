"""The rotation's graph edits, made after the weights are transformed: a norm's gain removed
(or a pre-norm LayerNorm rewritten as the masked RMSNorm of the rotated stream,
`make_scale_free`), the online Hadamards before a group of linears (`insert_online`), on
the queries and keys of an attention score MatMul (`insert_qk`), and around a KV cache on a
folded value path (`insert_cache_fold`)."""

from __future__ import annotations

import numpy as np
import onnx

from edgeq.ir import Graph, Op, Value
from edgeq.passes.hadamard_rotation.structure import Norm
from edgeq.quant.hadamard import Rotation
from edgeq.quant.sharing import is_owned_by_match


def make_scale_free(graph: Graph, norm: Norm) -> None:
    """Remove the norm's gain now that the readers carry it."""
    if norm.layer_norm:
        _layer_norm_to_masked_rms(graph, norm)
        return
    if norm.fused is not None:
        scale = norm.gamma
        graph.set_const(scale, np.ones(scale.const.dims, dtype=scale.const.dtype))
        return
    if norm.gamma_op is None:
        return
    out = graph.outputs_of(norm.gamma_op)[0]
    graph.replace_all_uses(out, norm.normed)
    graph.remove_op(norm.gamma_op)
    if not graph.consumers(norm.gamma) and not graph.is_graph_output(norm.gamma):
        graph.remove_value(norm.gamma)


def _last_axis_product(graph: Graph, x: Value, matrix: Value, name: str, op_type: str, before: Op) -> Op:
    """x M on x's last axis, as `Einsum("...a,az->...z")` or as `MatMul(x, M)` (the same product)."""
    attrs = {"equation": "...a,az->...z"} if op_type == "Einsum" else None
    return graph.add_op(op_type, [x, matrix], [name], attrs=attrs, before=before)


def insert_online(graph: Graph, x: Value, readers: list[Op], rotation: Rotation,
                  inv_scale: np.ndarray | None = None, op_type: str = "Einsum") -> Value:
    """x -> Reshape [.., f1, .., fk] -> (product on the last axis, Transpose it to the front of
    the factor axes)* -> product -> Reshape [.., n]: x K P with K = kron(normalised factors) and P
    the axis cycle (`Rotation.last_axis_form`); ORT's Einsum is several times slower on any other
    axis. The products are `op_type` ops (Einsum or MatMul). The readers read the result."""
    orders = [f.shape[0] for f in rotation.factors]
    width = rotation.order
    first = min(readers, key=lambda op: op.order)
    base = f"{x.name}_hadamard"
    elem = x.elem_type or onnx.TensorProto.FLOAT
    if x.shape is not None:   # rank known: keep the leading dims (Reshape's 0 copies them)
        rank = len(x.shape)
        lead: list | None = list(x.shape[:-1])
        split = graph.add_constant(f"{base}_split", np.array([0] * (rank - 1) + orders, dtype=np.int64))
        merge = graph.add_constant(f"{base}_merge", np.array([0] * (rank - 1) + [width], dtype=np.int64))
    else:                     # rank unknown: flatten the leading dims, restore x's own shape
        lead = None
        rank = 2
        split = graph.add_constant(f"{base}_split", np.array([-1] + orders, dtype=np.int64))
        merge = graph.outputs_of(graph.add_op("Shape", [x], [f"{base}_shape"], before=first))[0]
        merge.set_type(onnx.TensorProto.INT64, [None])
    y = x
    if inv_scale is not None:   # smoothing: x / s, in float like the rotation
        factor = graph.add_constant(f"{base}_smooth_inv_scale",
                                    inv_scale.astype(np.float16 if elem == onnx.TensorProto.FLOAT16 else np.float32))
        y = graph.outputs_of(graph.add_op("Mul", [x, factor], [f"{base}_smoothed"], before=first))[0]
        y.set_type(elem, None if x.shape is None else list(x.shape))
    if len(orders) > 1:
        reshape = graph.add_op("Reshape", [y, split], [f"{base}_split_out"], before=first)
        y = graph.outputs_of(reshape)[0]
        y.set_type(elem, None if lead is None else lead + orders)
    dtype = np.float16 if elem == onnx.TensorProto.FLOAT16 else np.float32
    factors = rotation.normalised_factors(dtype)
    layout = list(orders)
    n_lead = (rank - 1) if lead is not None else 1
    for step, i in enumerate(reversed(range(len(factors)))):
        factor = factors[i]
        matrix = graph.add_constant(f"{base}_factor{i}_{factor.shape[0]}", factor)
        product = _last_axis_product(graph, y, matrix, f"{base}_{step}", op_type, first)
        y = graph.outputs_of(product)[0]
        y.set_type(elem, None if lead is None else lead + layout)
        if i > 0:   # bring the next factor's axis last: move the contracted one to the front
            k = len(layout)
            perm = list(range(n_lead)) + [n_lead + k - 1] + [n_lead + j for j in range(k - 1)]
            transpose = graph.add_op("Transpose", [y], [f"{base}_{step}_t"], attrs={"perm": perm}, before=first)
            layout = [layout[-1]] + layout[:-1]
            y = graph.outputs_of(transpose)[0]
            y.set_type(elem, None if lead is None else lead + layout)
    if len(orders) > 1:
        back = graph.add_op("Reshape", [y, merge], [f"{base}_out"], before=first)
        y = graph.outputs_of(back)[0]
    y.set_type(elem, None if x.shape is None else list(x.shape))
    for reader in readers:
        for slot, value in enumerate(graph.inputs_of(reader)):
            if value is x and slot == 0:
                graph.set_input(reader, slot, y)
    return y


def insert_qk(graph: Graph, op: Op, head_dim: int, op_type: str = "Einsum") -> None:
    """q -> q H (last axis) and k^T -> H^T k^T (second-to-last axis): scores unchanged. As
    Einsums, or as MatMuls (`MatMul(H^T, k^T)` for the second)."""
    q, kt = graph.inputs_of(op)
    dense = Rotation.of_order(head_dim).dense().astype(np.float32)
    h = graph.add_constant(f"{op.name}_qk_hadamard", dense)
    targets = [(op, 0, q, "...a,az->...z"), (op, 1, kt, "...dt,dz->...zt")]
    transpose = graph.producer(kt)
    if transpose is not None and transpose.op_type == "Transpose" and not transpose.domain:
        perm = list(transpose.attr("perm") or [])
        k = graph.inputs_of(transpose)[0]
        rank = len(perm)
        if rank >= 2 and perm == list(range(rank - 2)) + [rank - 1, rank - 2] and \
                is_owned_by_match(graph, k, [transpose]):
            # rotate k on its last axis before the transpose: ORT's Einsum is slow on axis -2
            targets[1] = (transpose, 0, k, "...a,az->...z")
    for reader, slot, value, equation in targets:
        if op_type == "Einsum":
            product = graph.add_op("Einsum", [value, h], [f"{value.name}_hadamard"], attrs={"equation": equation},
                                   before=reader)
        elif equation == "...a,az->...z":
            product = graph.add_op("MatMul", [value, h], [f"{value.name}_hadamard"], before=reader)
        else:   # H^T k^T
            h_t = graph.add_constant(f"{op.name}_qk_hadamard_t", np.ascontiguousarray(dense.T))
            product = graph.add_op("MatMul", [h_t, value], [f"{value.name}_hadamard"], before=reader)
        out = graph.outputs_of(product)[0]
        out.set_type(value.elem_type or onnx.TensorProto.FLOAT, value.shape)
        graph.set_input(reader, slot, out)


def insert_cache_fold(graph: Graph, context: Value, o_proj: Op, caches: list[Op], block: np.ndarray,
                      rows: int, op_type: str = "Einsum") -> Value:
    """A per-head fold (W_v (I (x) H), (I (x) H)^T W_o) whose values pass a KV cache: the new
    values [B, kv, S, d] are rotated back (x H^T) before each `Concat(past, new)`, so the cache
    holds the float values, and the attention output [B, S, rows] is rotated per head
    (Reshape [0, 0, rows/d, d], x H, Reshape back) before o_proj. Returns the rotated output."""
    head_dim = block.shape[0]
    h = graph.add_constant(f"{o_proj.name}_cache_fold_h", block.astype(np.float32))
    h_t = graph.add_constant(f"{o_proj.name}_cache_fold_h_t", np.ascontiguousarray(block.T).astype(np.float32))
    for concat in caches:
        new = graph.inputs_of(concat)[1]
        back = graph.outputs_of(_last_axis_product(graph, new, h_t, f"{new.name}_unrotated", op_type, concat))[0]
        back.set_type(new.elem_type or onnx.TensorProto.FLOAT, new.shape)
        graph.set_input(concat, 1, back)
    base = f"{context.name}_cache_fold"
    split = graph.add_constant(f"{base}_split", np.array([0, 0, rows // head_dim, head_dim], np.int64))
    merge = graph.add_constant(f"{base}_merge", np.array([0, 0, rows], np.int64))
    heads = graph.outputs_of(graph.add_op("Reshape", [context, split], [f"{base}_heads"], before=o_proj))[0]
    rotated = graph.outputs_of(_last_axis_product(graph, heads, h, f"{base}_rotated", op_type, o_proj))[0]
    merged = graph.outputs_of(graph.add_op("Reshape", [rotated, merge], [f"{base}_out"], before=o_proj))[0]
    elem = context.elem_type or onnx.TensorProto.FLOAT
    for value in (heads, rotated):
        value.set_type(elem, None)
    merged.set_type(elem, context.shape)
    graph.set_input(o_proj, 0, merged)
    return merged


def _layer_norm_to_masked_rms(graph: Graph, norm: Norm) -> None:
    """LayerNormalization(x) on the stream, now x' = x Q with Q's first column constant:
    channel 0 of x' is sqrt(d) mean(x), the others are the centred x rotated, so
    LayerNorm(x) Q = m / sqrt(mean(m^2) + eps) with m = x' * [0, 1, ..., 1] (mean over all d
    channels, as LayerNorm's variance). gamma/beta are already in the readers."""
    op = norm.fused
    x = graph.inputs_of(op)[0]
    out = graph.outputs_of(op)[0]
    width = int(np.prod(norm.gamma.const.dims))
    dtype = norm.gamma.const.dtype
    eps = float(op.attr("epsilon", 1e-5))
    elem = x.elem_type or onnx.TensorProto.FLOAT
    base = f"{op.name}_rotated"
    mask = np.ones(width, dtype=dtype)
    mask[0] = 0
    mask_v = graph.add_constant(f"{base}_mask", mask)
    two = graph.add_constant(f"{base}_two", np.array(2.0, dtype=dtype))
    eps_v = graph.add_constant(f"{base}_eps", np.array(eps, dtype=dtype))

    def new(op_type, inputs, **attrs):
        created = graph.add_op(op_type, inputs, [f"{base}_{op_type}"], attrs=attrs or None, before=op)
        value = graph.outputs_of(created)[0]
        value.set_type(elem, x.shape if op_type not in ("ReduceMean", "Add", "Sqrt", "Reciprocal")
                       else (None if x.shape is None else list(x.shape[:-1]) + [1]))
        return value

    masked = new("Mul", [x, mask_v])
    square = new("Pow", [masked, two])
    opset = graph.model.opset_imports.get("", graph.model.opset_imports.get("ai.onnx", 17)) if graph.model else 17
    if opset >= 18:
        axes = graph.add_constant(f"{base}_axes", np.array([-1], dtype=np.int64))
        mean = new("ReduceMean", [square, axes], keepdims=1)
    else:
        mean = new("ReduceMean", [square], axes=[-1], keepdims=1)
    inv = new("Reciprocal", [new("Sqrt", [new("Add", [mean, eps_v])])])
    normed = graph.add_op("Mul", [masked, inv], [f"{base}_out"], before=op)
    result = graph.outputs_of(normed)[0]
    result.type = out.type
    graph.replace_all_uses(out, result)
    graph.remove_op(op)
    for const in (norm.gamma, norm.beta):
        if const is not None and not graph.consumers(const):
            graph.remove_value(const)
    for reader, shift in norm.bias_adds:   # the Add takes over the reader's output name
        reader_out = graph.outputs_of(reader)[0]
        name = reader_out.name
        graph.rename_value(reader_out, graph.unique_name(f"{name}_unbiased"))
        weight = graph.inputs_of(reader)[1]
        bias = graph.add_constant(f"{weight.name}_bias", shift.astype(weight.const.dtype))
        add = graph.add_op("Add", [reader_out, bias], [name], after=reader)
        biased = graph.outputs_of(add)[0]
        biased.type = reader_out.type
        for consumer, slot in graph.uses(reader_out):
            if consumer is not add:
                graph.set_input(consumer, slot, biased)
        graph.outputs = [biased if v is reader_out else v for v in graph.outputs]
