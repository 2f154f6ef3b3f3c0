"""Attention rules: activation x activation products (Q.K^T, P.V), the additive key mask and the
integer softmax.

Q.K^T is a MatMulInteger whose 1/sqrt(d) only changes the scale (folded into the softmax's); the
0/1 key mask becomes an additive int32 mask (0 / -2^31; a decoder's causal mask is computed from
positions, edgeq.backends.fpga.lowering.masks) carried with the scores to the softmax,
which gives uint16 probabilities (scale 2^-16; probability_bits=8: uint8, 1/256); P.V takes
16-bit P as two 8-bit digits, two products, the high one shifted by 8.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx

from edgeq.backends.fpga.integer.program import AddInt, AttentionMask, Digit, MatMulInt, Shift, SoftmaxInt
from edgeq.backends.fpga.lowering.forms import INT8, INT32, INT64, UINT8, UINT16, Form
from edgeq.backends.fpga.lowering.masks import MASK_LIMIT, position_mask
from edgeq.backends.fpga.lowering.state import Lowering
from edgeq.errors import OptionError
from edgeq.ir import Op, Value

PROBABILITY_DIGIT_BITS = 8   # 16-bit probabilities = high * 2^8 + low, two 8-bit digits


def act_matmul(lowering: Lowering, op: Op) -> None:
    """Activation x activation (Q.K^T, P.V) in MatMulInteger. 16-bit probabilities enter as
    two 8-bit digits, P = high * 2^8 + low: two products, the high one shifted by 8."""
    a_value, b_value = lowering.graph.inputs_of(op)
    out = lowering.graph.outputs_of(op)[0]
    unit = f"attention@{op.name}"
    a = lowering.form(a_value)
    b = lowering.int8(b_value.name)
    if a.dtype == UINT16 and a.per_tensor and a.unit.startswith("softmax@"):
        high = lowering.emit(Digit(a.name, PROBABILITY_DIGIT_BITS, True, unit=unit))
        low = lowering.emit(Digit(a.name, PROBABILITY_DIGIT_BITS, False, unit=unit))
        high = lowering.emit(Shift(lowering.emit(MatMulInt(high, b.name, unit=unit)), PROBABILITY_DIGIT_BITS,
                                   "int64", unit=unit))
        name = lowering.emit(AddInt(high, lowering.emit(MatMulInt(low, b.name, unit=unit)), "int64", unit=unit))
        lowering.forms[out.name] = Form(name, INT64, a.scale * b.scale, unit)
        return
    a = lowering.int8(a_value.name)
    name = lowering.emit(MatMulInt(a.name, b.name, unit=unit))
    lowering.forms[out.name] = Form(name, INT32, a.scale * b.scale, unit)


def masked_scores(lowering: Lowering, op: Op) -> None:
    """scores + additive mask: the scores' form carries the integer mask to the softmax."""
    graph = lowering.graph
    a, b = graph.inputs_of(op)
    scores, other = (a, b) if a.name in lowering.forms else (b, a)
    if graph.is_const(other):
        raise OptionError(f"Add '{op.name}' of a constant outside a linear layer's bias is not supported")
    mask = attention_mask(lowering, other, op)
    form = lowering.forms[scores.name]
    if form.mask is not None or form.dtype != INT32 or not form.per_tensor:
        raise OptionError(f"Add '{op.name}': the attention mask must be added to int32 scores")
    lowering.forms[graph.outputs_of(op)[0].name] = replace(form, mask=mask)


def attention_mask(lowering: Lowering, value: Value, reader: Op) -> str:
    """The integer additive mask for HF's (1 - mask[:, None, None, :]) * large_negative, or
    for a decoder's canonical causal (+ padding) bias (edgeq.backends.fpga.lowering.masks)."""
    if value.name in lowering.masks:
        return lowering.masks[value.name]
    causal = position_mask(lowering, value, reader)
    if causal is not None:
        lowering.masks[value.name] = causal
        return causal
    graph = lowering.graph
    problem = f"Add '{reader.name}': '{value.name}' is not an additive attention mask of a 0/1 input"
    mul = graph.producer(value)
    if mul is None or mul.op_type != "Mul":
        raise OptionError(problem)
    ins = graph.inputs_of(mul)
    consts = [graph.constant(v) for v in ins]
    if sum(c is not None for c in consts) != 1:
        raise OptionError(problem)
    factor = consts[0] if consts[0] is not None else consts[1]
    sub = graph.producer(ins[1] if consts[0] is not None else ins[0])
    if factor.numpy().size != 1 or float(factor.numpy().reshape(())) > MASK_LIMIT or sub is None \
            or sub.op_type != "Sub":
        raise OptionError(problem)
    one = graph.constant(graph.inputs_of(sub)[0])
    cast = graph.producer(graph.inputs_of(sub)[1])
    if one is None or one.numpy().size != 1 or float(one.numpy().reshape(())) != 1.0 or cast is None \
            or cast.op_type != "Cast":
        raise OptionError(problem)
    unsqueeze = graph.producer(graph.inputs_of(cast)[0])
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
        raise OptionError(problem)
    source, axes_value = (graph.inputs_of(unsqueeze) + [None])[:2]
    axes = graph.constant(axes_value).numpy().tolist() if axes_value is not None else unsqueeze.attr("axes")
    if source is None or graph.producer(source) is not None or source.elem_type not in (
            onnx.TensorProto.INT64, onnx.TensorProto.INT32) or axes is None:
        raise OptionError(problem)
    if not lowering.b.knows(source.name):
        lowering.b.declare_value(source.name, onnx.helper.tensor_dtype_to_np_dtype(source.elem_type))
    name = lowering.emit(AttentionMask(source.name, tuple(int(a) for a in axes), unit="mask@attention_mask"))
    lowering.masks[value.name] = name
    return name


def softmax(lowering: Lowering, op: Op) -> None:
    x_value = lowering.graph.inputs_of(op)[0]
    rank = len(x_value.shape) if x_value.shape is not None else None
    axis = op.attr("axis", -1)
    if axis != -1 and (rank is None or axis != rank - 1):
        raise OptionError(f"Softmax '{op.name}' over axis {axis}: the integer softmax runs over the last axis")
    x = lowering.form(x_value)
    if not x.per_tensor or x.dtype not in (INT8, INT32):
        raise OptionError(f"Softmax '{op.name}': scores must be int8/int32 with one scale")
    unit = f"softmax@{op.name}"
    wide = lowering.options.probability_bits == 16
    name = lowering.emit(SoftmaxInt(x.name, float(x.scale), x.mask, "uint16" if wide else "uint8", unit=unit))
    lowering.forms[lowering.graph.outputs_of(op)[0].name] = Form(name, UINT16 if wide else UINT8,
                                                                 np.asarray(2.0**-16 if wide else 2.0**-8), unit)
