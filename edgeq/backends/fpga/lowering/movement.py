"""Rules that compute no new integers: data movement (Reshape with a constant shape, Transpose)
reorders a tensor's integers, and a constant rescale (Div/Mul by a positive scalar) only changes
its scale, emitting nothing."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from edgeq.backends.fpga.integer.program import Move
from edgeq.backends.fpga.lowering.forms import INT16, INT32, INT64
from edgeq.backends.fpga.lowering.state import Lowering, unsupported
from edgeq.errors import OptionError
from edgeq.ir import Op


def move(lowering: Lowering, op: Op) -> None:
    graph = lowering.graph
    ins = graph.inputs_of(op)
    x = lowering.forms[ins[0].name]
    # a wide tensor with one scale moves as it is (a linear layer reading it rotates it
    # before its int8 requantization); channel-scaled ones are narrowed first
    if not (lowering.options.rotate and x.per_tensor and x.mask is None and x.dtype in (INT16, INT32, INT64)):
        x = lowering.int8(ins[0].name)
    if op.op_type == "Reshape":
        shape = graph.constant(ins[1]) if len(ins) > 1 else None
        if shape is None or op.attr("allowzero", 0):
            raise OptionError(f"Reshape '{op.name}' needs a constant shape (allowzero=0)")
        step = Move(x.name, "Reshape", shape=tuple(int(d) for d in shape.numpy().reshape(-1)))
    else:
        perm = op.attr("perm")
        if perm is None:
            raise OptionError(f"Transpose '{op.name}' without perm is not supported")
        step = Move(x.name, "Transpose", perm=tuple(int(p) for p in perm))
    name = lowering.emit(step)
    lowering.forms[graph.outputs_of(op)[0].name] = replace(x, name=name)


def rescale(lowering: Lowering, op: Op) -> None:
    """x / c or x * c with a constant scalar c: only the scale changes, no op is emitted (a
    consumer that needs a power-of-two scale fails to requantize; softmax folds it)."""
    graph = lowering.graph
    ins = graph.inputs_of(op)
    const = [graph.constant(v) for v in ins]
    if len(ins) != 2 or sum(c is not None for c in const) != 1:
        raise unsupported(op)
    c = const[0] if const[0] is not None else const[1]
    x = ins[1] if const[0] is not None else ins[0]
    if c.numpy().size != 1 or (op.op_type == "Div" and const[1] is None):
        raise unsupported(op)
    factor = float(c.numpy().reshape(()))
    if not (factor > 0 and math.isfinite(factor)):
        raise OptionError(f"{op.op_type} '{op.name}' by {factor}: only positive constant factors fold into a scale")
    form = lowering.form(x)
    scale = form.scale / factor if op.op_type == "Div" else form.scale * factor
    lowering.forms[graph.outputs_of(op)[0].name] = replace(form, scale=np.asarray(scale, np.float64))
