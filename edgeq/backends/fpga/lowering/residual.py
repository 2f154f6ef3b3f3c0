"""The residual-add rule: both integer operands shifted onto one power-of-two int32 grid (exact
left shifts, or rounding right shifts where an operand is finer than the grid's WIDE_BITS of
headroom allow) and added; a sum read only by a LayerNorm joins that norm's unit."""

from __future__ import annotations

import numpy as np

from edgeq.backends.fpga.integer.program import AddInt
from edgeq.backends.fpga.lowering.forms import INT32, Form
from edgeq.backends.fpga.lowering.state import Lowering
from edgeq.ir import Op


def residual_add(lowering: Lowering, op: Op) -> None:
    graph = lowering.graph
    a, b = (lowering.forms[v.name] for v in graph.inputs_of(op))
    out = graph.outputs_of(op)[0]
    readers = graph.consumers(out)
    single_norm = (len(readers) == 1 and readers[0].op_type == "LayerNormalization"
                   and not graph.is_graph_output(out))
    unit = f"residual_layernorm@{readers[0].name}" if single_norm else f"add@{op.name}"
    scale = lowering.scales.wide_scale(out.name, (a, b))
    left = lowering.align(a, scale, unit, f"residual add '{op.name}'")
    right = lowering.align(b, scale, unit, f"residual add '{op.name}'")
    name = lowering.emit(AddInt(left.name, right.name, "int32", unit=unit))
    lowering.forms[out.name] = Form(name, INT32, np.asarray(scale, np.float64), unit)
