"""What the Hadamard rotation can rotate, found by patterns (never by names): linears with
private weights (`as_linear`, `with_bias_add`, `linear_groups`), the residual stream of a
pre-norm decoder with its norms, their readers and the stream's writers (`match_stream`), and
SwiGLU's up projection that can take a smoothing factor exactly (`scalable_producer`).

A matcher raises `Refuse` naming the first thing that does not fit; the pass reports it, or
raises it as a RotationError when the user asked for that structure.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from edgeq.frontend.patterns import Role, Roles
from edgeq.ir import Graph, Op, Value
from edgeq.quant.sharing import is_owned_by_match, is_private_constant


class Refuse(Exception):
    """A structure does not match; the message says why (reported, or raised as RotationError)."""


@dataclass
class Linear:
    """MatMul(x, W) [+ Add(b)] with W a private [in, out] initializer."""

    op: Op
    weight: Value
    bias_op: Op | None = None
    bias: Value | None = None

    def output(self, graph: Graph) -> Value:
        return graph.outputs_of(self.bias_op or self.op)[0]


@dataclass
class Norm:
    """A scale-invariant normalisation reading the stream, and the linears reading it."""

    ops: list[Op]
    output: Value
    normed: Value                  # output before the gain
    gamma_op: Op | None            # Mul(gamma, normed) of a decomposed RMSNorm
    gamma: Value | None
    fused: Op | None               # RMSNormalization / SimplifiedLayerNormalization (gain = input 1)
    readers: list[Linear] = field(default_factory=list)
    beta: Value | None = None      # LayerNormalization's bias (pre-norm LayerNorm streams)
    layer_norm: bool = False       # centring LayerNorm: rewritten as RMSNorm of the masked rotated stream
    bias_adds: list[tuple[Op, np.ndarray]] = field(default_factory=list)  # (reader, beta W) without a bias


@dataclass
class Stream:
    """The residual stream of a pre-norm network: the embedding tables that start it, its
    values (one per residual Add), the norms reading it and the linears writing to it."""

    width: int
    embeddings: list[Value]        # tables [vocab, width]
    values: list[Value]
    norms: list[Norm]
    writers: list[Linear]


def as_linear(graph: Graph, op: Op, slot_of_x: int = 0) -> Linear | None:
    """MatMul(x, W) with W a private 2-D float initializer, as a Linear (bias not searched)."""
    if op.op_type != "MatMul" or op.domain:
        return None
    ins = graph.inputs_of(op)
    if len(ins) != 2 or ins[0] is None or graph.is_const(ins[0]):
        return None
    w = ins[1]
    if not is_private_constant(graph, w, op) or len(w.const.dims) != 2 or w.const.dtype.kind != "f":
        return None
    return Linear(op, w)


def linear_groups(graph: Graph) -> dict[Value, list[Op]]:
    """Linears (private [in, out] weights) grouped by the activation they read."""
    groups: dict[Value, list[Op]] = defaultdict(list)
    for op in graph.topo_order():
        linear = as_linear(graph, op)
        if linear is not None:
            groups[graph.inputs_of(op)[0]].append(op)
    return dict(groups)


def with_bias_add(graph: Graph, linear: Linear, width: int) -> Linear:
    """Extend a linear by its bias Add (const [width]) when the MatMul feeds only that Add."""
    out = graph.outputs_of(linear.op)[0]
    readers = graph.consumers(out)
    if len(readers) == 1 and readers[0].op_type == "Add" and not graph.is_graph_output(out):
        add = readers[0]
        ins = graph.inputs_of(add)
        other = ins[1] if ins[0] is out else ins[0]
        if other is not None and other.const is not None:
            if not is_private_constant(graph, other, add) or tuple(other.const.dims) != (width,):
                raise Refuse(f"bias {other.name!r} of a linear is shared or not a [{width}] vector")
            return Linear(linear.op, linear.weight, add, other)
    return linear


# Ops that read only a tensor's shape: x Q has the shape of x, so they may read the stream.
_SHAPE_ONLY = frozenset({"Shape", "Size"})


def match_stream(graph: Graph, roles: Roles) -> Stream:
    """The residual stream of a pre-norm decoder: embedding -> (norm -> readers; Add writer)* ->
    final norm -> readers. Raises Refuse naming the first thing that does not fit."""
    block_of = {op: block for role in (Role.RMS_NORM, Role.LAYER_NORM) for block in roles.blocks.get(role, [])
                for op in block}
    norm_blocks = [b for role in (Role.RMS_NORM, Role.LAYER_NORM) for b in roles.blocks.get(role, [])]
    if not norm_blocks:
        raise Refuse("no normalisation found")
    order = {op: i for i, op in enumerate(graph.topo_order())}
    first = min(norm_blocks, key=lambda b: min(order[op] for op in b))
    x0 = _block_input(graph, first)
    embeddings = _embedding_tables(graph, x0)
    width = embeddings[0].const.dims[1]
    values, norms, writers = [x0], [], []
    seen_norm_ops: set[Op] = set()
    while True:
        v = values[-1]
        if graph.is_graph_output(v):
            raise Refuse(f"stream value {v.name!r} is a graph output")
        adds = []
        for reader in graph.consumers(v):
            if reader in seen_norm_ops:
                continue
            if reader in block_of:
                norm = _match_norm(graph, roles.role(reader), block_of[reader], v, width)
                seen_norm_ops.update(norm.ops)
                norms.append(norm)
            elif reader.op_type == "Add" and not any(graph.is_const(i) for i in graph.inputs_of(reader)):
                adds.append(reader)
            elif reader.op_type in _SHAPE_ONLY and not reader.domain:
                continue  # reads only the shape, which the rotation keeps (exporters' mask/position inputs)
            else:
                raise Refuse(f"stream value {v.name!r} is read by {reader.op_type} {reader.name!r}, which "
                             "is neither a normalisation nor a residual Add")
        if not adds:
            break
        if len(adds) > 1:
            raise Refuse(f"stream value {v.name!r} feeds {len(adds)} residual Adds")
        add = adds[0]
        ins = graph.inputs_of(add)
        other = ins[1] if ins[0] is v else ins[0]
        if ins[0] is ins[1]:
            raise Refuse(f"residual Add {add.name!r} adds the stream to itself")
        writers.append(_match_writer(graph, other, add, width))
        values.append(graph.outputs_of(add)[0])
    last_norms = [n for n in norms if n.ops and any(r in n.ops for r in graph.consumers(values[-1]))]
    if not last_norms:
        raise Refuse(f"the stream's last value {values[-1].name!r} is not normalised (no final norm)")
    if not writers:
        raise Refuse("no residual Add on the stream (not a pre-norm residual network)")
    return Stream(width, embeddings, values, norms, writers)


def _block_input(graph: Graph, block: list[Op]) -> Value:
    inside = set(block)
    sources = {v for op in block for v in graph.inputs_of(op)
               if v is not None and not graph.is_const(v) and graph.producer(v) not in inside}
    if len(sources) != 1:
        raise Refuse("a normalisation reads more than one activation")
    return sources.pop()


def _embedding_tables(graph: Graph, v: Value) -> list[Value]:
    """The constant tables whose Gathers (summed, or scaled by a constant scalar) make v."""
    producer = graph.producer(v)
    if producer is None:
        raise Refuse(f"the stream starts at graph input {v.name!r}, not at an embedding")
    if producer.op_type == "Gather" and not producer.domain:
        table = graph.inputs_of(producer)[0]
        if producer.attr("axis", 0) != 0 or table is None or table.const is None or len(table.const.dims) != 2:
            raise Refuse(f"{producer.name!r} is not an embedding lookup of a 2-D table")
        if not is_private_constant(graph, table, producer):
            raise Refuse(f"embedding table {table.name!r} is read elsewhere too (tied weights?)")
        return [table]
    if producer.op_type == "Add":
        ins = graph.inputs_of(producer)
        if any(graph.is_const(i) for i in ins):
            raise Refuse(f"the stream starts at an Add with a constant ({producer.name!r})")
        tables = []
        for i in ins:
            if not is_owned_by_match(graph, i, [producer]):
                raise Refuse(f"embedding part {i.name!r} is read elsewhere too")
            tables += _embedding_tables(graph, i)
        return tables
    if producer.op_type == "Mul":
        ins = graph.inputs_of(producer)
        consts = [i for i in ins if graph.is_const(i)]
        if len(consts) == 1 and graph.constant(consts[0]).size == 1:
            data = ins[1] if ins[0] is consts[0] else ins[0]
            return _embedding_tables(graph, data)
    raise Refuse(f"the stream starts at {producer.op_type} {producer.name!r}, not at an embedding lookup")


def _reduce_axes(graph: Graph, op: Op) -> list[int] | None:
    axes = op.attr("axes")
    ins = graph.inputs_of(op)
    if axes is None and len(ins) > 1 and ins[1] is not None:
        tensor = graph.constant(ins[1])
        axes = None if tensor is None else [int(a) for a in np.asarray(tensor.numpy()).ravel()]
    return None if axes is None else list(axes)


def _is_last_axis(axes: list[int] | None, rank: int | None) -> bool:
    if axes is None or len(axes) != 1:
        return False
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)


def _match_norm(graph: Graph, role: Role | None, block: list[Op], x: Value, width: int) -> Norm:
    """A normalisation reading stream value x that rotations commute with once its gain is
    folded out: RMSNorm (decomposed or fused). LayerNorm in a pre-norm stream is refused."""
    rank = len(x.shape) if x.shape is not None else None
    if role == Role.LAYER_NORM:
        inside = set(block)
        outputs = [v for op in block for v in graph.outputs_of(op)
                   if v is not None and any(r not in inside for r in graph.consumers(v))]
        if any(r.op_type == "Add" and not any(graph.is_const(i) for i in graph.inputs_of(r))
               for v in outputs for r in graph.consumers(v)):
            raise Refuse(f"LayerNorm {block[0].name!r} is post-norm (its output feeds a residual Add, so "
                         "the stream carries its gamma/beta, which cannot be folded into the readers)")
        if len(block) != 1 or block[0].op_type != "LayerNormalization" or block[0].domain:
            raise Refuse(f"LayerNorm at {block[0].name!r} is decomposed; only a fused LayerNormalization "
                         "can be rewritten for a rotated stream")
        op = block[0]
        ins = graph.inputs_of(op)
        outs = graph.outputs_of(op)
        if ins[0] is not x or not (op.attr("axis", -1) == -1 or (rank is not None and op.attr("axis") == rank - 1)):
            raise Refuse(f"{op.name!r} does not normalise the stream's last axis")
        if any(v is not None and (graph.consumers(v) or graph.is_graph_output(v)) for v in outs[1:]):
            raise Refuse(f"{op.name!r}: its mean/inv-std outputs are used")
        beta = ins[2] if len(ins) > 2 else None
        for const in (ins[1], beta):
            if const is not None and (not is_private_constant(graph, const, op) or
                                      int(np.prod(const.const.dims)) != width):
                raise Refuse(f"{op.name!r}: gamma/beta are not private [{width}] constants")
        norm = Norm([op], outs[0], outs[0], None, ins[1], op, beta=beta, layer_norm=True)
        _attach_readers(graph, norm, width, with_bias=True)
        return norm
    if len(block) == 1 and block[0].op_type in ("RMSNormalization", "SimplifiedLayerNormalization"):
        op = block[0]
        ins = graph.inputs_of(op)
        outs = graph.outputs_of(op)
        if ins[0] is not x or len(ins) > 2 and ins[2] is not None:
            raise Refuse(f"{op.name!r}: unexpected inputs")
        if not (op.attr("axis", -1) == -1 or (rank is not None and op.attr("axis") == rank - 1)):
            raise Refuse(f"{op.name!r} does not normalise the last axis")
        if any(v is not None and (graph.consumers(v) or graph.is_graph_output(v)) for v in outs[1:]):
            raise Refuse(f"{op.name!r}: its statistics outputs are used")
        scale = ins[1]
        if not is_private_constant(graph, scale, op):
            raise Refuse(f"{op.name!r}: gain is not a private constant")
        norm = Norm([op], outs[0], outs[0], None, scale, op)
    else:
        inside = set(block)
        direct = [op for op in graph.consumers(x) if op in inside]
        pows = [op for op in direct if op.op_type == "Pow"]
        scalers = [op for op in direct if op.op_type in ("Mul", "Div")]
        if len(pows) != 1 or len(scalers) != 1 or len(direct) != 2:
            raise Refuse(f"normalisation at {block[0].name!r} is not x * rsqrt(mean(x^2) + eps)")
        exponent = graph.constant(graph.inputs_of(pows[0])[1])
        if exponent is None or exponent.size != 1 or float(np.asarray(exponent.numpy()).ravel()[0]) != 2.0:
            raise Refuse(f"{pows[0].name!r} is not x^2")
        means = [op for op in block if op.op_type == "ReduceMean"]
        if len(means) != 1 or not _is_last_axis(_reduce_axes(graph, means[0]), rank):
            raise Refuse(f"normalisation at {block[0].name!r} does not reduce over the last axis only")
        if scalers[0].op_type == "Div" and graph.inputs_of(scalers[0])[0] is not x:
            raise Refuse(f"{scalers[0].name!r} divides by the stream")
        normed = graph.outputs_of(scalers[0])[0]
        gamma_op = gamma = None
        output = normed
        readers = graph.consumers(normed)
        if len(readers) == 1 and readers[0] in inside and readers[0].op_type == "Mul":
            gamma_op = readers[0]
            ins = graph.inputs_of(gamma_op)
            gamma = ins[0] if ins[1] is normed else ins[1]
            # The gain is only read (folded into the readers) and its Mul removed, so it may be
            # shared: torch.onnx merges equal initializers (all-ones gains of a fresh model).
            if gamma is None or gamma.const is None or graph.is_graph_output(gamma) or \
                    any(v is gamma for v in graph.inputs) or gamma.const.dims[-1:] != (width,) or \
                    int(np.prod(gamma.const.dims)) != width:
                raise Refuse(f"RMSNorm gain {getattr(gamma, 'name', None)!r} is not a [{width}] constant")
            output = graph.outputs_of(gamma_op)[0]
        if any(op in inside for op in graph.consumers(output)):
            raise Refuse(f"RMSNorm at {block[0].name!r} has a bias (unsupported)")
        norm = Norm(list(block), output, normed, gamma_op, gamma, None)
    _attach_readers(graph, norm, width, with_bias=False)
    return norm


def _attach_readers(graph: Graph, norm: Norm, width: int, *, with_bias: bool) -> None:
    if graph.is_graph_output(norm.output):
        raise Refuse(f"normalised stream {norm.output.name!r} is a graph output")
    for reader in graph.consumers(norm.output):
        linear = as_linear(graph, reader)
        if linear is None or graph.inputs_of(reader)[0] is not norm.output:
            raise Refuse(f"normalised stream {norm.output.name!r} is read by {reader.op_type} {reader.name!r}, "
                         "not only by linears with private weights")
        if linear.weight.const.dims[0] != width:
            raise Refuse(f"{reader.name!r} weight has {linear.weight.const.dims[0]} rows, the stream {width}")
        if with_bias:
            linear = with_bias_add(graph, linear, linear.weight.const.dims[1])
        norm.readers.append(linear)


def _match_writer(graph: Graph, value: Value, add: Op, width: int) -> Linear:
    """The linear (MatMul [+ bias]) whose output the residual Add adds to the stream."""
    if not is_owned_by_match(graph, value, [add]):
        raise Refuse(f"residual branch {value.name!r} is read elsewhere too")
    producer = graph.producer(value)
    if producer is None:
        raise Refuse(f"residual Add {add.name!r} adds graph input {value.name!r}")
    if producer.op_type == "Add":
        ins = graph.inputs_of(producer)
        bias = next((i for i in ins if i is not None and i.const is not None), None)
        data = next((i for i in ins if i is not bias), None)
        matmul = graph.producer(data) if data is not None and bias is not None else None
        linear = as_linear(graph, matmul) if matmul is not None else None
        if linear is None or not is_owned_by_match(graph, data, [producer]):
            raise Refuse(f"residual branch {value.name!r} is not a linear layer's output")
        linear = with_bias_add(graph, linear, width)
    else:
        linear = as_linear(graph, producer)
        if linear is None:
            raise Refuse(f"residual branch {value.name!r} comes from {producer.op_type} {producer.name!r}, "
                         "not from a linear with a private weight")
    if linear.weight.const.dims[1] != width:
        raise Refuse(f"{linear.op.name!r} writes {linear.weight.const.dims[1]} channels, the stream has {width}")
    return linear


def norm_gain(graph: Graph, norm: Norm, width: int) -> np.ndarray | None:
    if norm.gamma is None:
        return None
    return np.asarray(norm.gamma.const.numpy(), dtype=np.float64).reshape(width)


def scalable_producer(graph: Graph, x: Value) -> Linear | None:
    """The linear whose output columns can take 1/s exactly: x = Mul(a, b) with b (or a) a
    linear's output read only by that Mul - SwiGLU's up projection."""
    producer = graph.producer(x)
    if producer is None or producer.op_type != "Mul" or producer.domain:
        return None
    ins = graph.inputs_of(producer)
    if len(ins) != 2 or any(v is None or graph.is_const(v) for v in ins) or ins[0] is ins[1]:
        return None
    for value in ins:
        if not is_owned_by_match(graph, value, [producer]):
            continue
        linear = _linear_producing(graph, value)
        if linear is not None:
            return linear
    return None


def _linear_producing(graph: Graph, value: Value) -> Linear | None:
    source = graph.producer(value)
    if source is None:
        return None
    if source.op_type == "MatMul":
        return as_linear(graph, source)
    if source.op_type == "Add":
        data = next((i for i in graph.inputs_of(source) if i is not None and i.const is None), None)
        matmul = graph.producer(data) if data is not None else None
        linear = as_linear(graph, matmul) if matmul is not None else None
        if linear is None:
            return None
        try:
            linear = with_bias_add(graph, linear, linear.weight.const.dims[1])
        except Refuse:
            return None
        return linear if linear.bias_op is source else None
    return None
