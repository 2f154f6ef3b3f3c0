"""The elementwise product of two integer tensors (SwiGLU's silu(gate) * up, the rotary products
x * cos and rotate_half(x) * sin): MulInt, exact, in a dtype wide enough that nothing saturates
(int8 x int8 in int16, up to 32 bits in int32); the scales multiply, so no requantization
happens here. A wider operand, or one with channel scales (the `up` accumulator), is first
shifted to int16 with one scale covering its calibrated bound; an operand computed on the host
from positions alone (cos/sin) enters quantized (edgeq.backends.fpga.lowering.host)."""

from __future__ import annotations

import numpy as np

from edgeq.backends.fpga.integer.decoder import MulInt
from edgeq.backends.fpga.lowering.forms import INT16, INT32, INT64, Form
from edgeq.backends.fpga.lowering.host import host_input
from edgeq.backends.fpga.lowering.state import Lowering
from edgeq.ir import Op, Value


def product(lowering: Lowering, op: Op) -> None:
    graph = lowering.graph
    a, b = (operand(lowering, v, op) for v in graph.inputs_of(op))
    bits = a.dtype.itemsize * 8 + b.dtype.itemsize * 8
    dtype = INT16 if bits <= 16 else INT32 if bits <= 32 else INT64
    unit = f"mul@{op.name}"
    name = lowering.emit(MulInt(a.name, b.name, str(dtype), unit=unit))
    lowering.forms[graph.outputs_of(op)[0].name] = Form(name, dtype, np.asarray(a.scale * b.scale, np.float64), unit)


def operand(lowering: Lowering, value: Value, reader: Op) -> Form:
    """A product's operand: per tensor, int8 or int16 (a wider or channel-scaled one, e.g. the
    `up` accumulator, shifted to int16 covering its calibrated bound)."""
    if value.name not in lowering.forms:
        return host_input(lowering, value, reader)
    return lowering.int16(value.name)
