"""Rotary embedding rules (canonical form 5):

    Add(Mul(x, cos), Mul(Concat(Neg(Slice(x, half:)), Slice(x, :half), axis=-1), sin))

rotate_half is data movement on integers (Slice, Concat) plus an exact negation in a wider dtype
(-(-128) = 128 needs int16); cos and sin depend on the positions only, so the host computes them
and they enter quantized (edgeq.backends.fpga.lowering.host); the two products are integer
products (edgeq.backends.fpga.lowering.products) and their sum an integer add on one int32 grid
(the residual-add rule), read as int8 by Q.K^T.
"""

from __future__ import annotations

from dataclasses import replace

from edgeq.backends.fpga.integer.decoder import ConcatInt, NegInt, SliceInt
from edgeq.backends.fpga.lowering.forms import INT8, INT16, INT32, INT64, UINT8, Form
from edgeq.backends.fpga.lowering.state import Lowering
from edgeq.errors import OptionError
from edgeq.ir import Op, Value

WIDER = {INT8: INT16, UINT8: INT16, INT16: INT32, INT32: INT64}


def neg(lowering: Lowering, op: Op) -> None:
    """-x, exact: in the next wider dtype."""
    x = moved_form(lowering, lowering.graph.inputs_of(op)[0])
    if x.dtype not in WIDER:
        raise OptionError(f"Neg '{op.name}' of a {x.dtype} tensor: the integer negation takes at most int32")
    unit = f"neg@{op.name}"
    dtype = WIDER[x.dtype]
    name = lowering.emit(NegInt(x.name, str(dtype), unit=unit))
    lowering.forms[lowering.graph.outputs_of(op)[0].name] = Form(name, dtype, x.scale, unit)


def slice_(lowering: Lowering, op: Op) -> None:
    """Slice with constant starts/ends/axes/steps (positive steps)."""
    graph = lowering.graph
    ins = graph.inputs_of(op) + [None] * 5
    consts = [graph.constant(v) if v is not None else None for v in ins[1:5]]
    if any(v is not None and c is None for v, c in zip(ins[1:5], consts)) or consts[0] is None or consts[1] is None:
        raise OptionError(f"Slice '{op.name}' needs constant starts, ends, axes and steps")
    starts, ends = (tuple(int(v) for v in c.numpy().reshape(-1)) for c in consts[:2])
    axes = tuple(int(v) for v in consts[2].numpy().reshape(-1)) if consts[2] is not None else tuple(range(len(starts)))
    steps = tuple(int(v) for v in consts[3].numpy().reshape(-1)) if consts[3] is not None else (1,) * len(starts)
    if any(s <= 0 for s in steps):
        raise OptionError(f"Slice '{op.name}' with a negative step is not supported")
    x = moved_form(lowering, ins[0])
    name = lowering.emit(SliceInt(x.name, starts, ends, axes, steps))
    lowering.forms[graph.outputs_of(op)[0].name] = replace(x, name=name)


def concat(lowering: Lowering, op: Op) -> None:
    """Concat of integer tensors with one scale (rotate_half's two halves), in the widest dtype."""
    graph = lowering.graph
    values = graph.inputs_of(op)
    if any(v is None or v.name not in lowering.forms for v in values):
        raise OptionError(f"Concat '{op.name}' joins a tensor that is not in the integer datapath")
    forms = [moved_form(lowering, v) for v in values]
    if any(float(f.scale) != float(forms[0].scale) for f in forms):
        raise OptionError(f"Concat '{op.name}' joins tensors of different scales",
                          fix="the fpga lowering concatenates tensors of one scale (rotate_half)")
    dtypes = {f.dtype for f in forms}
    if len(dtypes) > 1:   # mixed: the widest signed one (uint8 joins signed data as int16)
        dtypes = {INT16 if d == UINT8 else d for d in dtypes}
    dtype = max(dtypes, key=lambda d: d.itemsize)
    name = lowering.emit(ConcatInt(tuple(f.name for f in forms), int(op.attr("axis")), str(dtype)))
    lowering.forms[graph.outputs_of(op)[0].name] = Form(name, dtype, forms[0].scale, forms[0].unit)


def moved_form(lowering: Lowering, value: Value) -> Form:
    """The form data movement takes: per tensor without a pending mask (else int8 first)."""
    form = lowering.form(value)
    if form.per_tensor and form.mask is None:
        return form
    return lowering.int8(value.name)

