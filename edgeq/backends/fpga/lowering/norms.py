"""Normalization rules: LayerNormalization over the last axis as the integer LayerNorm (exact
isqrt, block floating point). Its output is int8, or int16 with one scale when the residual
stream is kept wide (residual_bits=16)."""

from __future__ import annotations

from edgeq.backends.fpga.integer.program import LayerNormInt
from edgeq.backends.fpga.lowering.forms import INT8, INT16, Form, scale_field
from edgeq.backends.fpga.lowering.state import Lowering
from edgeq.errors import OptionError
from edgeq.ir import Op


def layer_norm(lowering: Lowering, op: Op) -> None:
    graph = lowering.graph
    ins = graph.inputs_of(op)
    x_value = ins[0]
    rank = len(x_value.shape) if x_value.shape is not None else None
    axis = op.attr("axis", -1)
    if axis != -1 and (rank is None or axis != rank - 1):
        raise OptionError(f"LayerNormalization '{op.name}' over axis {axis}: only the last axis is supported")
    gamma = graph.constant(ins[1])
    beta = graph.constant(ins[2]) if len(ins) > 2 and ins[2] is not None else None
    if gamma is None or (len(ins) > 2 and ins[2] is not None and beta is None):
        raise OptionError(f"LayerNormalization '{op.name}' needs constant scale and bias")
    x = lowering.form(x_value)
    unit = x.unit if x.unit == f"residual_layernorm@{op.name}" else f"layernorm@{op.name}"
    if not x.per_tensor or x.mask is not None:
        x = lowering.align(x, lowering.scales.wide_scale(x_value.name, (x,)), unit, f"LayerNorm '{op.name}'")
    out = graph.outputs_of(op)[0]
    scale, dtype = lowering.scales.out_scale(out), INT8
    if lowering.options.residual_bits == 16 and scale.ndim == 0:
        scale, dtype = lowering.scales.int16_scale(out.name), INT16   # the residual stream
    step = LayerNormInt(x.name, float(x.scale), str(x.dtype),
                        tuple(float(g) for g in gamma.numpy().reshape(-1)),
                        None if beta is None else tuple(float(v) for v in beta.numpy().reshape(-1)),
                        float(op.attr("epsilon", 1e-5)), scale_field(scale), unit=unit, out_dtype=str(dtype))
    name = lowering.emit(step)
    lowering.forms[out.name] = Form(name, dtype, scale, unit)
