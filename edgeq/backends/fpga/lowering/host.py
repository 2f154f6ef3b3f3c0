"""Float tensors the host computes from the inputs' positions, entering the datapath quantized.

A decoder's rotary cos/sin tables depend only on the token positions (the input shapes, or
position ids, or the shape of the embedding sum): no datapath value is upstream of them. The host computes them, as it looks up
the embedding, and they enter through a QuantizeLinear to int8 with their calibrated
power-of-two scale; their ops are listed in the model's `edgeq.host_ops` with the reason.
"""

from __future__ import annotations

import math

import numpy as np

from edgeq.backends.fpga.integer.program import Quantize
from edgeq.backends.fpga.lowering.forms import INT8, Form
from edgeq.backends.fpga.lowering.state import Lowering
from edgeq.errors import OptionError
from edgeq.ir import Graph, Op, Value


def host_input(lowering: Lowering, value: Value, reader: Op) -> Form:
    """The int8 form of float tensor `value`, computed on the host from the graph inputs (or the
    shapes of host tensors) only."""
    if value.name in lowering.forms:
        return lowering.forms[value.name]
    graph = lowering.graph
    ops, upstream = host_closure(graph, value)
    datapath_shapes = [op for op in ops if op.op_type == "Shape" and op not in lowering.host
                       and graph.inputs_of(op)[0].name in lowering.forms]
    if graph.producer(value) is None or any(v.name in lowering.forms for v in upstream) or datapath_shapes:
        raise OptionError(f"{reader.op_type} '{reader.name}' reads '{value.name}', which is neither integer nor "
                          "computed from the inputs' positions alone",
                          fix="the fpga lowering takes host-computed tables (rotary cos/sin) and datapath values only")
    inputs = [v for v in graph.inputs if v in upstream]
    shapes_only = all(reader_op.op_type == "Shape" for v in inputs for reader_op in graph.consumers(v)
                      if reader_op in ops)
    why = ("host op: computed from the input shapes (token positions) only, e.g. rotary cos/sin, before its "
           "QuantizeLinear" if shapes_only else
           f"host op: computed from the inputs {', '.join(v.name for v in inputs)} (positions), e.g. rotary "
           "cos/sin, before its QuantizeLinear")
    for op in ops:
        if op not in lowering.host:
            lowering.host.add(op)
            lowering.done.add(op)
            lowering.host_why[op] = why
    scale = lowering.scales.act_scale(value.name)
    bound = trig_bound(graph, value)
    if bound:   # cos/sin: never finer than their bound needs, whatever the calibration saw
        scale = max(scale, math.ldexp(1.0, math.ceil(math.log2(bound / 128.0))))
    name = lowering.emit(Quantize(value.name, float(scale), unit=""))
    form = Form(name, INT8, np.asarray(scale, np.float64))
    lowering.forms[value.name] = form
    return form


def host_closure(graph: Graph, value: Value) -> tuple[set[Op], set[Value]]:
    """The ops computing `value` and the values they read, not looking past a Shape op (it reads
    its input's shape, not its data): what the host runs to compute `value`."""
    ops: set[Op] = set()
    values: set[Value] = set()
    stack = [value]
    while stack:
        current = stack.pop()
        op = graph.producer(current)
        if op is None or op in ops:
            continue
        ops.add(op)
        if op.op_type == "Shape" and not op.domain:
            continue
        for v in graph.inputs_of(op):
            if v is not None and v not in values:
                values.add(v)
                stack.append(v)
    return ops, values


def host_shape(lowering: Lowering, op: Op) -> None:
    """Shape of a host tensor (the embedding sum the datapath starts from): a host op, as the
    position subgraph it feeds (a decoder counts positions from the embedding's shape)."""
    source = lowering.graph.inputs_of(op)[0]
    producer = lowering.graph.producer(source)
    if producer is not None and producer not in lowering.host:
        raise OptionError(f"Shape '{op.name}' reads '{source.name}' inside the integer datapath",
                          fix="run the front end's canonicalize pass first (shapes folded, or read from inputs)")
    lowering.host.add(op)
    lowering.host_why[op] = "host op: the shape of a host tensor (token positions), read by the position subgraph"


def trig_bound(graph: Graph, value: Value) -> float | None:
    """The bound of |value| when it is a Cos or Sin times constant scalars (through data
    movement and casts), as rotary tables are (e.g. HF's attention_scaling); else None."""
    factor, current = 1.0, value
    while True:
        op = graph.producer(current)
        if op is None or op.domain:
            return None
        if op.op_type in ("Cos", "Sin"):
            return factor
        ins = graph.inputs_of(op)
        if op.op_type in ("Unsqueeze", "Reshape", "Squeeze", "Transpose", "Cast", "Identity", "Expand"):
            current = ins[0]
        elif op.op_type == "Mul" and len(ins) == 2 and sum(graph.is_const(v) for v in ins) == 1:
            const, current = (ins[0], ins[1]) if graph.is_const(ins[0]) else (ins[1], ins[0])
            array = graph.constant(const).numpy()
            if array.size != 1:
                return None
            factor *= abs(float(array.reshape(())))
        else:
            return None
