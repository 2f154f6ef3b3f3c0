"""Grouped-query attention's repeat of the key/value heads (canonical form 5):

    Reshape(Expand(Unsqueeze(k, [2]), [1, 1, n_rep, 1, 1]), [0, H, -1, d])

as data movement on int8 (Unsqueeze, Expand; the Reshape is the movement rule's). A wider
tensor (the rotary sum of k) is shifted to int8 before it is repeated, since Q.K^T and P.V read
int8 anyway: the repeat moves n_rep copies of 8-bit data, not of int32.
"""

from __future__ import annotations

from dataclasses import replace

from edgeq.backends.fpga.integer.decoder import ExpandInt, UnsqueezeInt
from edgeq.backends.fpga.lowering.forms import INT8, UINT8, Form
from edgeq.backends.fpga.lowering.state import Lowering
from edgeq.errors import OptionError
from edgeq.ir import Op, Value


def unsqueeze(lowering: Lowering, op: Op) -> None:
    graph = lowering.graph
    ins = graph.inputs_of(op)
    axes = op.attr("axes")
    if axes is None and len(ins) > 1 and ins[1] is not None and graph.constant(ins[1]) is not None:
        axes = graph.constant(ins[1]).numpy().reshape(-1).tolist()
    if axes is None:
        raise OptionError(f"Unsqueeze '{op.name}' needs constant axes")
    x = narrow(lowering, ins[0])
    name = lowering.emit(UnsqueezeInt(x.name, tuple(int(a) for a in axes)))
    lowering.forms[graph.outputs_of(op)[0].name] = replace(x, name=name)


def expand(lowering: Lowering, op: Op) -> None:
    graph = lowering.graph
    x_value, shape_value = graph.inputs_of(op)
    shape = graph.constant(shape_value)
    if shape is None:
        raise OptionError(f"Expand '{op.name}' needs a constant shape",
                          fix="run the front end's canonicalize pass first (Expand with 1 where it keeps a dim)")
    x = narrow(lowering, x_value)
    name = lowering.emit(ExpandInt(x.name, tuple(int(d) for d in shape.numpy().reshape(-1))))
    lowering.forms[graph.outputs_of(op)[0].name] = replace(x, name=name)


def narrow(lowering: Lowering, value: Value) -> Form:
    form = lowering.form(value)
    if form.per_tensor and form.mask is None and form.dtype in (INT8, UINT8):
        return form
    return lowering.int8(value.name)
