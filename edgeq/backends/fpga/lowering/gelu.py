"""The GELU rule: a fused Gelu, or a GELU block the front end's patterns found (Erf or Tanh
formula, checked numerically), as I-BERT's i-GELU on one int32 grid; its output is int8, or
int16 when only linear layers read it and the online Hadamard transform replaces its int8
requantization (rotate=True)."""

from __future__ import annotations

import math

import numpy as np

from edgeq.backends.fpga.integer.program import GeluInt
from edgeq.backends.fpga.lowering.forms import INT8, INT16, Form, scale_field
from edgeq.backends.fpga.lowering.state import Lowering
from edgeq.errors import OptionError
from edgeq.frontend.patterns import Role
from edgeq.ir import Graph, Op, Value


def gelu(lowering: Lowering, op: Op) -> None:
    graph = lowering.graph
    if op.op_type == "Gelu":
        block, x_value, out = [op], graph.inputs_of(op)[0], graph.outputs_of(op)[0]
    else:
        block = next(b for b in lowering.roles.blocks[Role.GELU] if op in b)
        x_value, out = gelu_block_io(graph, block)
    x = lowering.form(x_value)
    unit = f"gelu@{block[0].name}"
    x = lowering.align(x, lowering.scales.wide_scale(x_value.name, (x,)), unit, f"GELU '{block[0].name}'")
    scale, dtype = lowering.scales.out_scale(out), INT8
    if lowering.options.rotate and scale.ndim == 0 and read_by_linears_only(graph, out):
        # int16 into the Hadamard transform; one int8 requantization after it
        scale, dtype = lowering.scales.int16_scale(out.name), INT16
    name = lowering.emit(GeluInt(x.name, float(x.scale), scale_field(scale), unit=unit, out_dtype=str(dtype)))
    lowering.forms[out.name] = Form(name, dtype, scale, unit)
    for member in block:
        if member is not op:
            lowering.mark_lowered(member)


def read_by_linears_only(graph: Graph, value: Value) -> bool:
    """Whether `value` is read only by linear layers (as their activation), so an int16
    output feeding the online Hadamard transform can replace its int8 requantization."""
    uses = graph.uses(value)
    return bool(uses) and not graph.is_graph_output(value) and all(
        reader.op_type == "MatMul" and slot == 0 and graph.is_const(graph.inputs_of(reader)[1])
        for reader, slot in uses)


def gelu_block_io(graph: Graph, block: list[Op]) -> tuple[Value, Value]:
    """(x, output) of a GELU block, after checking numerically that it computes GELU(x)."""
    produced = {id(v) for op in block for v in graph.outputs_of(op) if v is not None}
    externals = {v.name: v for op in block for v in graph.inputs_of(op)
                 if v is not None and id(v) not in produced and not graph.is_const(v)}
    ends = [v for op in block for v in graph.outputs_of(op)
            if v is not None and (graph.is_graph_output(v) or any(r not in block for r in graph.consumers(v)))]
    if len(externals) != 1 or len(ends) != 1:
        raise OptionError(f"GELU block at '{block[0].name}' does not have one input and one output")
    (x,) = externals.values()
    (out,) = ends
    probe = np.linspace(-6.0, 6.0, 49)
    values = {x.name: probe}
    unary = {"Erf": np.vectorize(math.erf), "Tanh": np.tanh, "Sqrt": np.sqrt}
    binary = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power}
    for member in graph.topo_order():
        if member not in block:
            continue
        args = [values[v.name] if v.name in values else graph.constant(v).numpy().astype(np.float64)
                for v in graph.inputs_of(member)]
        if member.op_type in unary:
            result = unary[member.op_type](args[0])
        elif member.op_type in binary and len(args) == 2:
            result = binary[member.op_type](*args)
        else:
            raise OptionError(f"GELU block op {member.op_type} '{member.name}' is not supported")
        values[graph.outputs_of(member)[0].name] = result
    exact = 0.5 * probe * (1.0 + np.vectorize(math.erf)(probe / math.sqrt(2.0)))
    if not np.allclose(values[out.name], exact, atol=2e-3):
        raise OptionError(f"the block at '{block[0].name}' is not GELU(x)")
    return x, out
