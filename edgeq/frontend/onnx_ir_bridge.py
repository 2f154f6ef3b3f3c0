"""The edgeq Graph as an `onnx_ir` model and back, for kept optimizers (onnxscript's constant
folder) to work on, without copying weights through protobuf.

`to_onnx_ir(graph, hide_above=N)` builds the onnx_ir model from the graph's structure only
(`graph_to_proto(with_data=False)`); every initializer up to N bytes becomes a constant whose
`ir.Tensor` wraps the edgeq tensor's numpy view (a file map for loaded weights: nothing is
read or copied), and every larger one a typed graph input, so the optimizer sees its dtype and
shape (Shape of a weight folds) but nothing computed from it is constant.
`from_onnx_ir(model, bridge)` serializes the optimized model's structure and rebuilds the Graph
from it: hidden weights turn back into initializers, every initializer's data is handed over
by name (the edgeq tensor itself for untouched weights, the optimizer's new arrays for folded
values), node names of ops that are still there are restored, and the optimizer's bookkeeping
metadata is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from edgeq.ir import Graph, Tensor
from edgeq.ir.from_proto import graph_from_proto
from edgeq.ir.graph import ModelInfo
from edgeq.ir.to_proto import graph_to_proto, model_header

# Metadata onnxscript's folder writes onto values it folded (a record of their sources).
_OPTIMIZER_METADATA = ("pkg.onnxscript.optimizer.folded_from",)


@dataclass
class Bridge:
    """What `from_onnx_ir` needs to rebuild the Graph."""

    graph: Graph
    hidden: list[str] = field(default_factory=list)           # weights passed as typed graph inputs
    wrapped: dict[str, object] = field(default_factory=dict)  # name -> the ir.Tensor wrapping our tensor
    node_names: dict[str, tuple[str, str]] = field(default_factory=dict)  # first output -> (op_type, name)
    initializer_order: list[str] = field(default_factory=list)


def to_onnx_ir(graph: Graph, *, hide_above: int) -> tuple[ir.Model, Bridge]:
    """The onnx_ir model of `graph`; initializers over `hide_above` bytes become typed inputs."""
    bridge = Bridge(graph, initializer_order=[v.name for v in graph.initializers])
    model = model_header(graph)
    model.graph.CopyFrom(graph_to_proto(graph, with_data=False))
    input_names = {v.name for v in graph.inputs}
    keep = []
    for proto, value in zip(model.graph.initializer, graph.initializers):
        if value.const.nbytes > hide_above and value.name not in input_names:
            model.graph.input.append(onnx.helper.make_tensor_value_info(
                value.name, value.const.elem_type, list(value.const.dims)))
            bridge.hidden.append(value.name)
        else:
            # No data: the ir.Tensor set below carries it (typed-field tensors keep theirs).
            header = onnx.TensorProto()
            header.CopyFrom(proto)
            keep.append(header)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    for op in graph.ops():
        outs = [v for v in graph.outputs_of(op) if v is not None]
        if outs:
            bridge.node_names[outs[0].name] = (op.op_type, op.name)
    ir_model = ir.serde.deserialize_model(model)
    for name, value in ir_model.graph.initializers.items():
        tensor = graph.value(name).const
        wrapped = ir.Tensor(tensor.numpy(), dtype=ir.DataType(tensor.elem_type), name=name)
        value.const_value = wrapped
        bridge.wrapped[name] = wrapped
    return ir_model, bridge


def from_onnx_ir(ir_model: ir.Model, bridge: Bridge) -> Graph:
    """The Graph of the optimized `ir_model` (see the module docstring)."""
    ir_graph = ir_model.graph
    tensors: dict[str, Tensor] = {}
    headers: dict[str, onnx.TensorProto] = {}
    for name, value in list(ir_graph.initializers.items()):
        const = value.const_value
        if const is bridge.wrapped.get(name):
            tensor = bridge.graph.value(name).const
        else:
            array = np.asarray(const.numpy())
            tensor = Tensor.from_array(np.ascontiguousarray(array).reshape(array.shape))
        tensors[name] = tensor
        headers[name] = tensor.header_proto(name)
        ir_graph.initializers.pop(name)  # serialize the structure only
    for name in bridge.hidden:
        tensor = bridge.graph.value(name).const
        tensors[name] = tensor
        headers[name] = tensor.header_proto(name)
    proto = ir.serde.serialize_graph(ir_graph)
    hidden = set(bridge.hidden)
    inputs = [vi for vi in proto.input if vi.name not in hidden]
    del proto.input[:]
    proto.input.extend(inputs)
    order = [n for n in bridge.initializer_order if n in headers]
    order += [n for n in headers if n not in set(order)]
    proto.initializer.extend(headers[n] for n in order)
    _strip_optimizer_metadata(proto)
    _restore_node_names(proto, bridge)
    info = _model_info(bridge.graph.model, ir_model)
    rebuilt = graph_from_proto(proto, model=info, tensors=tensors)
    old = bridge.graph
    rebuilt.name, rebuilt.doc_string, rebuilt.metadata_props = old.name, old.doc_string, old.metadata_props
    rebuilt.quantization_annotation = list(old.quantization_annotation)
    return rebuilt


def _strip_optimizer_metadata(proto: onnx.GraphProto) -> None:
    for vi in [*proto.value_info, *proto.output, *proto.input]:
        kept = [(e.key, e.value) for e in vi.metadata_props if e.key not in _OPTIMIZER_METADATA]
        if len(kept) != len(vi.metadata_props):
            del vi.metadata_props[:]
            for key, val in kept:
                entry = vi.metadata_props.add()
                entry.key, entry.value = key, val


def _restore_node_names(proto: onnx.GraphProto, bridge: Bridge) -> None:
    """onnx_ir names unnamed nodes; an op that is still there keeps its own name (or none)."""
    taken = {n.name for n in proto.node}
    for node in proto.node:
        first = next((o for o in node.output if o), None)
        original = bridge.node_names.get(first)
        if original is not None and original[0] == node.op_type and node.name != original[1]:
            if original[1] and original[1] in taken:
                continue
            node.name = original[1]


def _model_info(info: ModelInfo | None, ir_model: ir.Model) -> ModelInfo:
    """The original ModelInfo (copied), with the optimized model's local functions."""
    base = info or ModelInfo()
    copy = ModelInfo(**{k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                        for k, v in vars(base).items()})
    copy.functions = [ir.serde.serialize_function(f) for f in ir_model.functions.values()]
    return copy
