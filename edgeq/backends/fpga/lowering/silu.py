"""The SiLU rule: the canonical x * Sigmoid(x) (canonical form 4) as the integer SiLU
(edgeq.backends.fpga.integer.Silu: i-exp sigmoid, one multiply, a shift) on one int32 grid, to
int8 with one power-of-two scale. SwiGLU's product with `up` is an ordinary integer product
(edgeq.backends.fpga.lowering.products)."""

from __future__ import annotations

import numpy as np

from edgeq.backends.fpga.integer.decoder import SiluInt
from edgeq.backends.fpga.lowering.forms import INT8, INT16, Form
from edgeq.backends.fpga.lowering.state import Lowering
from edgeq.errors import OptionError
from edgeq.ir import Graph, Op, Value


def silu(lowering: Lowering, op: Op) -> None:
    graph = lowering.graph
    sigmoid = op   # the block's first op in topological order (its Mul reads it)
    x_value = graph.inputs_of(sigmoid)[0]
    ratio = graph.outputs_of(sigmoid)[0]
    readers = graph.consumers(ratio)
    mul = readers[0] if len(readers) == 1 and not graph.is_graph_output(ratio) else None
    if sigmoid.op_type != "Sigmoid" or mul is None or mul.op_type != "Mul" or mul.domain \
            or x_value not in graph.inputs_of(mul):
        raise OptionError(f"{op.op_type} '{op.name}' is not part of a SiLU x * Sigmoid(x): the fpga lowering has "
                          "no integer rule for a lone sigmoid",
                          fix="run the front end's canonicalize pass first")
    x = lowering.form(x_value)
    unit = f"silu@{sigmoid.name}"
    x = lowering.align(x, lowering.scales.wide_scale(x_value.name, (x,)), unit, f"SiLU '{sigmoid.name}'")
    out = graph.outputs_of(mul)[0]
    if read_by_products_only(graph, out):   # SwiGLU: a 16-bit operand of the product with `up`
        scale, dtype = lowering.scales.int16_scale(out.name), INT16
    else:
        scale, dtype = lowering.scales.act_scale(out.name), INT8
    name = lowering.emit(SiluInt(x.name, float(x.scale), float(scale), unit=unit, out_dtype=str(dtype)))
    lowering.forms[out.name] = Form(name, dtype, np.asarray(scale, np.float64), unit)
    for member in (sigmoid, mul):
        if member is not op:
            lowering.mark_lowered(member)


def read_by_products_only(graph: Graph, value: Value) -> bool:
    """Whether `value` is read only as an operand of products of two non-constant tensors."""
    readers = graph.consumers(value)
    return bool(readers) and not graph.is_graph_output(value) and all(
        r.op_type == "Mul" and not r.domain and not any(graph.is_const(v) for v in graph.inputs_of(r))
        for r in readers)
