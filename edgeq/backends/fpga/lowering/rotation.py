"""Online Walsh-Hadamard rotation (QuaRot's idea, `rotate=True`): Sylvester's +-1 transform on
blocks of b channels, integer adds and subtracts only, spreads a wide tensor's outlier channels
over their block before its one int8 requantization; the orthogonal rotation folds into the
reading layer's float weights. Also the rotated entry: embedding tables stored pre-rotated on the
host, rotated back by the datapath's first step.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np

from edgeq.backends.fpga.integer.program import HadamardInt, Quantize, Shift
from edgeq.backends.fpga.lowering.forms import INT8, INT16, INT32, Form, exponent
from edgeq.backends.fpga.lowering.ranges import rotated_name
from edgeq.backends.fpga.lowering.state import Lowering
from edgeq.ir import Op, Value
from edgeq.quant.hadamard import Rotation, sylvester

# Online Walsh-Hadamard blocks: the largest power of two dividing the channel count, capped
# here (log2 of it is the adder stages; 384 -> 128, 1536 -> 512 for MiniLM).
HADAMARD_MAX_BLOCK = 512


def hadamard_block(channels: int) -> int:
    """The online Walsh-Hadamard block for `channels`: its largest power-of-two divisor, capped."""
    return min(channels & -channels, HADAMARD_MAX_BLOCK) if channels > 0 else 1


def rotated(lowering: Lowering, name: str, channels: int | None = None) -> tuple[Form, Rotation]:
    """The wide (int16) tensor `name` after an online Walsh-Hadamard transform (integer adds
    and subtracts, blocks of b channels), requantized once to int8 with one power-of-two
    scale: the calibrated range of the float tensor x @ blockdiag(H_b). Outlier channels are
    spread over their block, so one scale per tensor serves every channel."""
    if name not in lowering.rotations:
        x = lowering.forms[name]
        channels = channels or int(lowering.graph.value(name).shape[-1])
        block = hadamard_block(channels)
        unit = f"hadamard@{name}"
        if x.dtype != INT16:   # an accumulator: to int16 first (|H x| <= b * 2^15 fits int32)
            scale16 = lowering.scales.int16_scale(name)
            x = Form(lowering.emit(Shift(x.name, exponent(x.scale / scale16, f"narrowing '{name}'"), "int16",
                                         unit=unit)), INT16, scale16, unit)
        y = lowering.emit(HadamardInt(x.name, block, "int32", unit=unit))
        scale = lowering.scales.act_scale(rotated_name(name, block))
        shift = exponent(x.scale / scale, f"requantizing the rotated '{name}'")
        out = lowering.emit(Shift(y, shift, "int8", unit=unit))
        rotation = Rotation((sylvester(block),), blocks=channels // block)
        lowering.rotations[name] = (Form(out, INT8, np.asarray(scale, np.float64), unit), rotation)
    return lowering.rotations[name]


def rotatable_tables(lowering: Lowering, entry: Value, norm: Collection[Op]) -> list[Value] | None:
    """The embedding tables whose rows sum to `entry` (an Add tree of Gathers of [V, C]
    initializers read by nothing else, `entry` read only by the first norm's ops `norm` and, in
    a pre-norm decoder, the residual adds that start the stream), or None."""
    graph = lowering.graph
    channels = entry.shape[-1] if entry.shape else None
    readers = [reader for reader, _ in graph.uses(entry)]
    if not isinstance(channels, int) or hadamard_block(channels) < 2 or graph.is_graph_output(entry) \
            or not any(reader in norm for reader in readers) \
            or any(reader not in norm and not _joins_residual(graph, reader) for reader in readers):
        return None
    tables, stack = [], [entry]
    while stack:
        value = stack.pop()
        op = graph.producer(value)
        if op is None or op.domain or (value is not entry and (len(graph.uses(value)) != 1
                                                              or graph.is_graph_output(value))):
            return None
        ins = graph.inputs_of(op)
        if op.op_type == "Add" and len(ins) == 2 and not any(graph.is_const(v) for v in ins):
            stack.extend(ins)
        elif op.op_type == "Gather" and op.attr("axis", 0) == 0 and ins[0].const is not None \
                and ins[0].const.numpy().ndim == 2 and ins[0].const.numpy().shape[1] == channels \
                and len(graph.uses(ins[0])) == 1:
            tables.append(ins[0])
        else:
            return None
    return tables


def _joins_residual(graph, op: Op) -> bool:
    """An Add of two non-constant tensors (the entry is the first residual add's skip input)."""
    ins = graph.inputs_of(op)
    return op.op_type == "Add" and not op.domain and len(ins) == 2 and not any(graph.is_const(v) for v in ins)


def rotated_entry(lowering: Lowering, entry: Value, tables: list[Value]) -> None:
    """The embedding sum enters rotated: each table's rows are multiplied by H_b / b on the
    host side (a weight change, the host still only looks rows up and adds them), the sum is
    quantized to int8 with one scale (the outlier channels spread over their blocks), and the
    datapath's first step multiplies by H_b again (integer adds; H_b H_b = b I): the int32
    embedding sum on the same power-of-two scale, read by the first LayerNorm."""
    channels = int(entry.shape[-1])
    block = hadamard_block(channels)
    # range of x H_b / b: that of the calibrated x H_b over b (a power of two: exact)
    scale = np.asarray(lowering.scales.act_scale(rotated_name(entry.name, block)) / block, np.float64)
    unit = f"hadamard@{entry.name}"
    name = lowering.emit(Quantize(entry.name, float(scale), unit=""))
    out = lowering.emit(HadamardInt(name, block, "int32", unit=unit))
    lowering.forms[entry.name] = Form(out, INT32, scale, unit)
    rotation = Rotation((sylvester(block),), blocks=channels // block)
    for table in tables:
        rows = table.const.numpy()
        lowering.table_updates.append(
            (table, (rotation.apply(rows.astype(np.float64), 1) / math.sqrt(block)).astype(rows.dtype)))
