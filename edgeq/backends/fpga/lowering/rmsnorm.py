"""The RMSNorm rule: the front end's canonical RMSNorm (canonical form 2, edgeq's builder form)

    Mul(gamma, Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2), axes=[-1], keepdims=1), eps)))))

as the integer RMSNorm (edgeq.backends.fpga.integer.Normalization, not centred: exact isqrt,
block floating point), reading the int32 residual sums of a pre-norm decoder directly. Its output
is read by linear layers only (Q/K/V, gate/up, the LM head), so gamma folds into their weights
(x W with x = gamma * t is t (diag(gamma) W), as QuaRot folds it): the norm emits t = x / rms(x),
whose channels are all of one size (|t_c| <= sqrt(C)), not the outlier channels a large gamma
makes; t is int16 with one scale when the online Walsh-Hadamard transform replaces its int8
requantization (rotate=True), int8 otherwise. A norm read by anything else keeps gamma.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeq.backends.fpga.integer.decoder import RmsNormInt
from edgeq.backends.fpga.lowering.forms import INT8, INT16, Form, scale_field
from edgeq.backends.fpga.lowering.linear import constant_weight
from edgeq.backends.fpga.lowering.state import Lowering
from edgeq.errors import OptionError
from edgeq.frontend.patterns import Role
from edgeq.ir import Graph, Op, Value

CANONICAL = ("Mul(gamma, Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2), axes=[-1], keepdims=1), eps)))))")


@dataclass(frozen=True)
class RmsBlock:
    """A canonical RMSNorm: its ops (Pow first), input, output, gamma and eps."""

    ops: tuple[Op, ...]
    x: Value
    normed: Value    # x / sqrt(mean(x^2) + eps), before gamma
    out: Value       # gamma * normed (normed itself when gamma is absent)
    gamma: np.ndarray
    eps: float


def match_rms_norm(graph: Graph, op: Op) -> RmsBlock | None:
    """The canonical RMSNorm starting at `op` (its Pow), or None."""
    if op.op_type != "Pow" or op.domain:
        return None
    x, exponent = (graph.inputs_of(op) + [None])[:2]
    if x is None or not _is_scalar(graph, exponent, 2.0):
        return None
    chain = [op]
    reduce = _only_reader(graph, op, "ReduceMean")
    if reduce is None or reduce.attr("keepdims", 1) != 1 or not _last_axis(graph, reduce, x):
        return None
    add = _only_reader(graph, reduce, "Add")
    eps = _scalar_operand(graph, add)
    sqrt = _only_reader(graph, add, "Sqrt") if eps is not None else None
    reciprocal = _only_reader(graph, sqrt, "Reciprocal") if sqrt is not None else None
    normed = _only_reader(graph, reciprocal, "Mul") if reciprocal is not None else None
    if normed is None or x not in graph.inputs_of(normed) or eps < 0:
        return None
    chain += [reduce, add, sqrt, reciprocal, normed]
    out = before_gamma = graph.outputs_of(normed)[0]
    gamma = np.ones(1, np.float64)
    scaled = _only_reader(graph, normed, "Mul")
    if scaled is not None:
        other = [v for v in graph.inputs_of(scaled) if v is not out]
        const = graph.constant(other[0]) if len(other) == 1 else None
        if const is not None and const.numpy().size > 1 and const.numpy().squeeze().ndim == 1:
            gamma = const.numpy().astype(np.float64).reshape(-1)
            chain.append(scaled)
            out = graph.outputs_of(scaled)[0]
    channels = x.shape[-1] if x.shape else None
    if not isinstance(channels, int):
        channels = gamma.size if gamma.size > 1 else None
    if channels is None:
        return None
    if gamma.size == 1:
        gamma = np.full(channels, float(gamma[0]))
    if gamma.size != channels:
        return None
    return RmsBlock(tuple(chain), x, before_gamma, out, gamma, float(eps))


def rms_norm(lowering: Lowering, op: Op) -> None:
    graph = lowering.graph
    start = _block_start(lowering, op)
    block = match_rms_norm(graph, start) if start is not None else None
    if block is None:
        raise OptionError(f"{op.op_type} '{op.name}' is not part of an RMSNorm in the canonical form {CANONICAL}",
                          fix="run the front end's canonicalize pass first")
    x = lowering.form(block.x)
    unit = f"rmsnorm@{start.name}"
    if not x.per_tensor or x.mask is not None or x.dtype not in (np.dtype(np.int8), np.dtype(np.int16),
                                                                   np.dtype(np.int32), np.dtype(np.int64)):
        x = lowering.align(x, lowering.scales.wide_scale(block.x.name, (x,)), unit, f"RMSNorm '{start.name}'")
    linears_only = read_by_linears_only(graph, block.out)
    # gamma folds into the reading layers' weights: the norm emits t = x / rms(x), |t_c| <= sqrt(C),
    # free of the outlier channels a large gamma makes (QuaRot folds it the same way)
    fold = linears_only and block.normed is not block.out
    out = block.normed if fold else block.out
    gamma = np.ones_like(block.gamma) if fold else block.gamma
    scale, dtype = lowering.scales.out_scale(out), INT8
    if lowering.options.rotate and scale.ndim == 0 and linears_only:
        scale, dtype = lowering.scales.int16_scale(out.name), INT16   # into the Hadamard transform
    step = RmsNormInt(x.name, float(x.scale), str(x.dtype), tuple(float(g) for g in gamma), block.eps,
                      scale_field(scale), unit=unit, out_dtype=str(dtype))
    name = lowering.emit(step)
    lowering.forms[out.name] = Form(name, dtype, scale, unit)
    if fold:   # the gamma output's integers are t's; the probe's channel scales say so
        lowering.forms[block.out.name] = Form(name, dtype, scale * block.gamma, unit)
        lowering.folded[block.out.name] = (out.name, block.gamma)
    for member in block.ops:
        if member is not op:
            lowering.mark_lowered(member)


def read_by_linears_only(graph: Graph, value: Value) -> bool:
    """Whether only linear layers read `value` (as their activation; weights may be a Transpose
    of an initializer, a tied LM head)."""
    uses = graph.uses(value)
    return bool(uses) and not graph.is_graph_output(value) and all(
        reader.op_type == "MatMul" and slot == 0 and constant_weight(graph, graph.inputs_of(reader)[1]) is not None
        for reader, slot in uses)


def _block_start(lowering: Lowering, op: Op) -> Op | None:
    """The Pow of the RMSNorm `op` belongs to (the driver meets it first)."""
    if op.op_type == "Pow":
        return op
    for block in lowering.roles.blocks.get(Role.RMS_NORM, ()):
        if op in block:
            return next((member for member in block if member.op_type == "Pow"), None)
    return None


def _only_reader(graph: Graph, op: Op, op_type: str) -> Op | None:
    out = graph.outputs_of(op)[0]
    readers = graph.consumers(out)
    if len(readers) != 1 or readers[0].op_type != op_type or readers[0].domain or graph.is_graph_output(out):
        return None
    return readers[0]


def _is_scalar(graph: Graph, value: Value | None, expected: float) -> bool:
    const = graph.constant(value)
    return const is not None and const.numpy().size == 1 and float(const.numpy().reshape(())) == expected


def _scalar_operand(graph: Graph, op: Op | None) -> float | None:
    """The constant scalar operand of a binary op, or None."""
    if op is None:
        return None
    consts = [graph.constant(v) for v in graph.inputs_of(op)]
    found = [c for c in consts if c is not None]
    if len(consts) != 2 or len(found) != 1 or found[0].numpy().size != 1:
        return None
    return float(found[0].numpy().reshape(()))


def _last_axis(graph: Graph, reduce: Op, x: Value) -> bool:
    ins = graph.inputs_of(reduce)
    axes = reduce.attr("axes")
    if axes is None and len(ins) > 1 and ins[1] is not None:
        const = graph.constant(ins[1])
        axes = None if const is None else const.numpy().reshape(-1).tolist()
    if axes is None or len(axes) != 1:
        return False
    rank = len(x.shape) if x.shape is not None else None
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)
