"""Transformer structure found by patterns, not by node names.

`find_roles(graph)` labels ops with the role of the block they belong to: LayerNorm (fused
`LayerNormalization` or decomposed ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div), RMSNorm
(decomposed Pow/ReduceMean/Add/Sqrt/(Div|Reciprocal)/Mul), softmax, GELU (Erf or Tanh
formula), SiLU (x*Sigmoid(x)), residual adds, linear layers and activation x activation
matmuls. It is an analysis: it never mutates the graph.

Compiled (QDQ) graphs show the same blocks: a weight reached through DequantizeLinear (and data
movement) is a constant, the integer linear kernels (MatMulInteger, QLinearMatMul, ConvInteger,
com.microsoft MatMulNBits/QGemm/MatMulIntegerToFloat/DynamicQuantizeMatMul) are linears when their
weight is constant, and a QuantizeLinear -> DequantizeLinear pair on an activation is looked
through when blocks are matched.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from enum import Enum

from edgeq.ir import Graph, Op, Value

# Ops that only move or reshape data: quantization passes through them unchanged.
DATA_MOVEMENT = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Gather",
                           "Identity", "Expand"})
# Matrix products and the input slot of their weight: a linear when that input is constant.
_PRODUCTS = {("", "MatMul"): 1, ("", "Gemm"): 1, ("", "MatMulInteger"): 1, ("", "QLinearMatMul"): 3,
             ("", "ConvInteger"): 1, ("com.microsoft", "MatMulNBits"): 1, ("com.microsoft", "QGemm"): 3,
             ("com.microsoft", "MatMulIntegerToFloat"): 1, ("com.microsoft", "DynamicQuantizeMatMul"): 1}


class Role(str, Enum):
    LAYER_NORM = "LayerNorm"
    RMS_NORM = "RMSNorm"
    SOFTMAX = "Softmax"
    GELU = "GELU"
    SILU = "SiLU"
    RESIDUAL_ADD = "ResidualAdd"
    LINEAR = "Linear"
    ATTENTION_MATMUL = "AttentionMatMul"
    EMBEDDING = "Embedding"


@dataclass
class Roles:
    """op -> role, and the blocks found (each a list of ops) per role."""

    of_op: dict[Op, Role] = field(default_factory=dict)
    blocks: dict[Role, list[list[Op]]] = field(default_factory=lambda: defaultdict(list))

    def role(self, op: Op) -> Role | None:
        return self.of_op.get(op)

    def add(self, role: Role, ops: list[Op]) -> None:
        fresh = [op for op in ops if op not in self.of_op]
        if not fresh:
            return
        for op in fresh:
            self.of_op[op] = role
        self.blocks[role].append(fresh)

    def counts(self) -> dict[str, int]:
        return {role.value: len(blocks) for role, blocks in self.blocks.items()}


def find_roles(graph: Graph) -> Roles:
    roles = Roles()
    order = graph.topo_order()
    for op in order:
        if op.op_type in ("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization"):
            roles.add(Role.LAYER_NORM if op.op_type != "SimplifiedLayerNormalization" else Role.RMS_NORM, [op])
        elif op.op_type == "RMSNormalization":
            roles.add(Role.RMS_NORM, [op])
        elif op.op_type == "ReduceMean":
            _match_norm(graph, op, roles)
    for op in order:
        if op.op_type == "Softmax":
            roles.add(Role.SOFTMAX, [op])
        elif op.op_type == "Erf":
            _match_gelu_erf(graph, op, roles)
        elif op.op_type == "Sigmoid":
            _match_silu(graph, op, roles)
        elif op.op_type == "Gelu":
            roles.add(Role.GELU, [op])
    for op in order:
        slot = _PRODUCTS.get((op.domain, op.op_type))
        if slot is not None:
            ins = graph.inputs_of(op)
            if len(ins) > slot and _is_const_chain(graph, ins[slot]):
                roles.add(Role.LINEAR, [op])
            elif not _is_const_chain(graph, ins[0]):
                roles.add(Role.ATTENTION_MATMUL, [op])
        elif op.op_type == "Gather" and not op.domain and _is_const_chain(graph, graph.inputs_of(op)[0]):
            roles.add(Role.EMBEDDING, [op])
        elif op.op_type == "Add" and op not in roles.of_op and _is_residual(graph, op):
            roles.add(Role.RESIDUAL_ADD, [op])
    return roles


def lm_heads(graph: Graph, roles: Roles) -> list[Op]:
    """Linear layers whose output is a graph output (through data movement and casts only):
    the LM head of a decoder (logits), a classifier's last projection."""
    heads = []
    for op in roles.blocks.get(Role.LINEAR, ()):
        value = _out(graph, op[0])
        while not graph.is_graph_output(value):
            readers = graph.consumers(value)
            if len(readers) != 1 or (readers[0].op_type not in DATA_MOVEMENT and readers[0].op_type != "Cast"):
                break
            value = _out(graph, readers[0])
        else:
            heads.append(op[0])
    return heads


def _single_consumer(graph: Graph, value: Value | None, op_type: str) -> Op | None:
    if value is None:
        return None
    readers = _readers(graph, value)
    return next((r for r in readers if r.op_type == op_type), None)


def _readers(graph: Graph, value: Value) -> list[Op]:
    """The ops reading `value`, looking through QuantizeLinear -> DequantizeLinear pairs."""
    found = []
    for reader in graph.consumers(value):
        if reader.op_type == "QuantizeLinear" and not reader.domain:
            for dq in graph.consumers(graph.outputs_of(reader)[0]):
                if dq.op_type == "DequantizeLinear" and not dq.domain:
                    found.extend(graph.consumers(graph.outputs_of(dq)[0]))
        else:
            found.append(reader)
    return found


def _source(graph: Graph, value: Value | None) -> Value | None:
    """`value` with a QuantizeLinear -> DequantizeLinear pair in front of it looked through."""
    dq = graph.producer(value) if value is not None else None
    if dq is not None and dq.op_type == "DequantizeLinear" and not dq.domain:
        q = graph.producer(graph.inputs_of(dq)[0])
        if q is not None and q.op_type == "QuantizeLinear" and not q.domain:
            return graph.inputs_of(q)[0]
    return value


def _producer(graph: Graph, value: Value | None) -> Op | None:
    value = _source(graph, value)
    return graph.producer(value) if value is not None else None


def _out(graph: Graph, op: Op) -> Value:
    return graph.outputs_of(op)[0]


def _match_norm(graph: Graph, reduce: Op, roles: Roles) -> None:
    """LayerNorm: x -> ReduceMean -> Sub(x, mean) -> Pow 2 -> ReduceMean -> Add eps -> Sqrt -> Div.
    RMSNorm:   x -> Pow 2 -> ReduceMean -> Add eps -> Sqrt -> Div(1, .)|Reciprocal -> Mul(x, .)."""
    x = graph.inputs_of(reduce)[0]
    producer = _producer(graph, x)
    if producer is not None and producer.op_type == "Pow":
        _match_rms(graph, producer, reduce, roles)
        return
    sub = _single_consumer(graph, _out(graph, reduce), "Sub")
    pow_ = _single_consumer(graph, _out(graph, sub), "Pow") if sub else None
    mean2 = _single_consumer(graph, _out(graph, pow_), "ReduceMean") if pow_ else None
    add = _single_consumer(graph, _out(graph, mean2), "Add") if mean2 else None
    sqrt = _single_consumer(graph, _out(graph, add), "Sqrt") if add else None
    div = _single_consumer(graph, _out(graph, sqrt), "Div") if sqrt else None
    if div is None:
        return
    ops = [reduce, sub, pow_, mean2, add, sqrt, div]
    ops += _affine_tail(graph, div)
    roles.add(Role.LAYER_NORM, ops)


def _match_rms(graph: Graph, pow_: Op, reduce: Op, roles: Roles) -> None:
    add = _single_consumer(graph, _out(graph, reduce), "Add")
    sqrt = _single_consumer(graph, _out(graph, add), "Sqrt") if add else None
    inv = None
    if sqrt is not None:
        inv = _single_consumer(graph, _out(graph, sqrt), "Reciprocal") or _single_consumer(
            graph, _out(graph, sqrt), "Div")
    else:  # x * Rsqrt-free form: Add -> Reciprocal(Sqrt) absent; try Pow(-0.5)
        inv = _single_consumer(graph, _out(graph, add), "Pow") if add else None
    if inv is None:
        return
    ops = [pow_, reduce, add] + ([sqrt] if sqrt else []) + [inv]
    scale = _single_consumer(graph, _out(graph, inv), "Mul")
    if inv.op_type == "Div" and graph.inputs_of(inv)[0] is not None and not graph.is_const(graph.inputs_of(inv)[0]):
        scale = None  # Div(x, sqrt) form: the Div itself normalises
    if scale is not None:
        ops.append(scale)
        ops += _affine_tail(graph, scale)
    else:
        ops += _affine_tail(graph, inv)
    roles.add(Role.RMS_NORM, ops)


def _affine_tail(graph: Graph, op: Op) -> list[Op]:
    """The gamma Mul and beta Add following a normalisation, when their operands are constant."""
    tail = []
    current = op
    for op_type in ("Mul", "Add"):
        nxt = _single_consumer(graph, _out(graph, current), op_type)
        if nxt is None or not any(graph.is_const(v) for v in graph.inputs_of(nxt)):
            break
        tail.append(nxt)
        current = nxt
    return tail


def _match_gelu_erf(graph: Graph, erf: Op, roles: Roles) -> None:
    """x * 0.5 * (1 + Erf(x / sqrt 2)) in the orders exporters produce."""
    ops = [erf]
    div = _producer(graph, graph.inputs_of(erf)[0])
    if div is not None and div.op_type in ("Div", "Mul"):
        ops.insert(0, div)
    add = _single_consumer(graph, _out(graph, erf), "Add")
    if add is None:
        return
    ops.append(add)
    current = add
    for _ in range(2):
        mul = _single_consumer(graph, _out(graph, current), "Mul")
        if mul is None:
            break
        ops.append(mul)
        current = mul
    roles.add(Role.GELU, ops)


def _match_silu(graph: Graph, sigmoid: Op, roles: Roles) -> None:
    x = _source(graph, graph.inputs_of(sigmoid)[0])
    mul = _single_consumer(graph, _out(graph, sigmoid), "Mul")
    if mul is not None and any(_source(graph, v) is x for v in graph.inputs_of(mul)):
        roles.add(Role.SILU, [sigmoid, mul])


def _is_const_chain(graph: Graph, value: Value | None) -> bool:
    """A weight: a constant, or one reached through data movement and DequantizeLinear (e.g.
    Transpose of an initializer, a compiled model's DequantizeLinear of an integer weight)."""
    while value is not None and not graph.is_const(value):
        producer = graph.producer(value)
        if producer is None or producer.domain or (producer.op_type not in DATA_MOVEMENT
                                                   and producer.op_type != "DequantizeLinear"):
            return False
        value = graph.inputs_of(producer)[0]
    return value is not None


def _is_residual(graph: Graph, add: Op) -> bool:
    """An Add x + f(x) closing a skip connection: one operand (the skip, x) is upstream of the
    other and also feeds the block itself (a norm or linear, not only Adds). Mask adds (the mask
    feeds only Adds), RoPE's two halves and embedding sums are not skip connections."""
    ins = graph.inputs_of(add)
    if len(ins) != 2 or any(v is None or graph.is_const(v) for v in ins) or ins[0] is ins[1]:
        return False
    for skip, other in (ins, ins[::-1]):
        feeds_a_block = any(reader.op_type != "Add" for reader in graph.consumers(skip))
        if feeds_a_block and skip in graph.upstream(other):
            return True
    return False
