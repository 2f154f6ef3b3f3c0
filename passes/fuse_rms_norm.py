"""Rewrite the front end's canonical RMSNorm into one ONNX `RMSNormalization` (opset 23).

The canonical form (edgeq's builder form, the front end's output) is
`Mul(gamma, Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2), axes=[-1], keepdims=1), eps)))))`.
A runtime that quantizes every tensor (an NPU) would quantize x^2, its mean and the reciprocal
square root on their own 8/16-bit grids, where x^2 spans the square of the activations' range:
most of its values round to zero, and QNN's HTP computes the 16-bit Reciprocal wrongly (Llama
fixture logits cosine 0.39 on the simulator). One RMSNormalization op is what such runtimes run
as a single kernel (QNN: RmsNorm), with only x, gamma and the output quantized.

The op needs opset 23: the model's default-domain opset import is raised to 23 when a norm is
fused (the other ops keep their meaning from 21 to 23: those versions only add types).
"""

from __future__ import annotations

import numpy as np

from edgeq.ir import Graph, Op, Value
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.registry import register_pass

RMS_NORMALIZATION_OPSET = 23


@register_pass
class FuseRmsNorm(Pass):
    name = "fuse-rms-norm"
    description = "rewrite the canonical decomposed RMSNorm into one RMSNormalization op (opset 23)"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        fused = 0
        for op in graph.topo_order():
            if op.op_type == "Reciprocal" and not op.domain:
                match = _match(graph, op)
                if match is not None and _rewrite(graph, *match):
                    fused += 1
        if fused and graph.model is not None:
            opsets = graph.model.opset_imports
            key = "" if "" in opsets or "ai.onnx" not in opsets else "ai.onnx"
            opsets[key] = max(opsets.get(key, 1), RMS_NORMALIZATION_OPSET)
        return PassResult(graph, fused > 0, {"rms_norms": fused})


def _only_reader(graph: Graph, value: Value, op_type: str) -> Op | None:
    readers = graph.consumers(value)
    if len(readers) != 1 or graph.is_graph_output(value) or readers[0].op_type != op_type or readers[0].domain:
        return None
    return readers[0]


def _scalar(graph: Graph, value: Value | None) -> float | None:
    tensor = graph.constant(value) if value is not None else None
    if tensor is None or tensor.dtype.kind != "f" or int(np.prod(tensor.dims)) != 1:
        return None
    return float(tensor.numpy().reshape(()))


def _producer(graph: Graph, value: Value | None, op_type: str) -> Op | None:
    op = graph.producer(value) if value is not None else None
    return op if op is not None and op.op_type == op_type and not op.domain else None


def _other(graph: Graph, op: Op, value: Value) -> Value | None:
    """The operand of binary `op` that is not `value` (None if both are)."""
    a, b = graph.inputs_of(op)[:2]
    return b if a is value else a if b is value else None


def _match(graph: Graph, recip: Op) -> tuple[list[Op], Value, Value | None, float, Value] | None:
    """(ops to replace, last first; x, gamma, eps, output) of the canonical RMSNorm around `recip`."""
    sqrt = _producer(graph, graph.inputs_of(recip)[0], "Sqrt")
    add = _producer(graph, graph.inputs_of(sqrt)[0], "Add") if sqrt else None
    if add is None:
        return None
    a, b = graph.inputs_of(add)[:2]
    eps_value, mean_value = (a, b) if _scalar(graph, a) is not None else (b, a)
    eps = _scalar(graph, eps_value)
    mean = _producer(graph, mean_value, "ReduceMean")
    if eps is None or mean is None or not _last_axis_kept(graph, mean):
        return None
    pow_ = _producer(graph, graph.inputs_of(mean)[0], "Pow")
    if pow_ is None or _scalar(graph, graph.inputs_of(pow_)[1]) != 2.0:
        return None
    x = graph.inputs_of(pow_)[0]
    chain = [(pow_, "ReduceMean"), (mean, "Add"), (add, "Sqrt"), (sqrt, "Reciprocal")]
    if any(_only_reader(graph, graph.outputs_of(op)[0], reader) is None for op, reader in chain):
        return None
    scale = _only_reader(graph, graph.outputs_of(recip)[0], "Mul")
    if scale is None or _other(graph, scale, graph.outputs_of(recip)[0]) is not x:
        return None
    ops = [scale, recip, sqrt, add, mean, pow_]
    output, gamma = graph.outputs_of(scale)[0], None
    affine = _only_reader(graph, output, "Mul")
    if affine is not None:
        candidate = graph.constant(_other(graph, affine, output) or output)
        channels = x.shape[-1] if x.shape else None
        if candidate is not None and candidate.dtype.kind == "f" and len(candidate.dims) == 1 \
                and (channels is None or candidate.dims[0] == channels):
            gamma, output = _other(graph, affine, output), graph.outputs_of(affine)[0]
            ops.insert(0, affine)
    return ops, x, gamma, eps, output


def _last_axis_kept(graph: Graph, mean: Op) -> bool:
    ins = graph.inputs_of(mean)
    axes = graph.constant(ins[1]).numpy().tolist() if len(ins) > 1 and ins[1] is not None \
        and graph.is_const(ins[1]) else mean.attr("axes")
    if axes is None or len(axes) != 1 or mean.attr("keepdims", 1) != 1:
        return False
    rank = len(graph.inputs_of(mean)[0].shape or ()) or None
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)


def _rewrite(graph: Graph, ops: list[Op], x: Value, gamma: Value | None, eps: float, output: Value) -> bool:
    """RMSNormalization(x, gamma) in place of `ops` (last first), writing `output` (its name kept)."""
    if gamma is None:
        channels = x.shape[-1] if x.shape and isinstance(x.shape[-1], int) else None
        if channels is None:
            return False
        gamma = graph.add_constant(f"{ops[0].name}_ones", np.ones(channels, np.float32))
    norm = graph.add_op("RMSNormalization", [x, gamma], [f"{output.name}_rms"],
                        attrs={"axis": -1, "epsilon": float(eps)}, after=graph.producer(output))
    fused = graph.outputs_of(norm)[0]
    fused.type = output.type
    graph.take_over(output, fused, "decomposed")
    for op in ops:  # each read only by the next: nothing else reads them now
        graph.remove_op(op)
    return True
