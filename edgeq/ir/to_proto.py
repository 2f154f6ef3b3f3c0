"""Graph -> ONNX protos: the GraphProto of a Graph (nested graphs included), the ModelProto
header its ModelInfo describes, and the whole model in memory.

Nodes come out in the Graph's topological order (original order kept where it can be), each
node's attributes in their original order, and value_info as the source had it followed by
newly typed values, so an untouched model is written back as it was read.
"""

from __future__ import annotations

import onnx

from edgeq.ir.graph import Graph, ModelInfo, Op, Value


def graph_to_proto(graph: Graph, *, with_data: bool = True, include_initializers: bool = True) -> onnx.GraphProto:
    """The GraphProto of `graph`; top-level weights carry data only if `with_data` (typed-field
    tensors always carry theirs). Nested graphs always carry their (small) weights."""
    proto = onnx.GraphProto()
    proto.name = graph.name
    if graph.doc_string:
        proto.doc_string = graph.doc_string
    for key, value in graph.metadata_props:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    if include_initializers:
        for value in graph.initializers:
            proto.initializer.append(value.const.to_proto(value.name, with_data=with_data))
    proto.sparse_initializer.extend(graph.sparse_initializers)
    for value in graph.inputs:
        proto.input.append(_value_info(value))
    for value in graph.outputs:
        proto.output.append(_value_info(value))
    ops = graph.topo_order()
    for op in ops:
        proto.node.append(_node_proto(graph, op))
    proto.value_info.extend(_value_infos(graph, ops))
    proto.quantization_annotation.extend(graph.quantization_annotation)
    return proto


def _value_info(value: Value) -> onnx.ValueInfoProto:
    vi = onnx.ValueInfoProto()
    vi.name = value.name
    if value.type is not None:
        vi.type.CopyFrom(value.type)
    if value.doc_string:
        vi.doc_string = value.doc_string
    for key, val in getattr(value, "metadata_props", ()):
        entry = vi.metadata_props.add()
        entry.key, entry.value = key, val
    return vi


def _value_infos(graph: Graph, ops: list[Op]) -> list[onnx.ValueInfoProto]:
    """value_info: first every entry the source had (in its order), then typed new values."""
    boundary = {v.name for v in graph.inputs} | {v.name for v in graph.outputs}
    seen: set[str] = set()
    infos = []
    for name in graph.value_info_order:
        if graph.has_value(name) and name not in seen:
            infos.append(_value_info(graph.value(name)))
            seen.add(name)
    for op in ops:
        for value in graph.outputs_of(op):
            if value is not None and value.type is not None and value.name not in seen and value.name not in boundary:
                infos.append(_value_info(value))
                seen.add(value.name)
    return infos


def _node_proto(graph: Graph, op: Op) -> onnx.NodeProto:
    node = onnx.NodeProto()
    node.op_type = op.op_type
    if op.name:
        node.name = op.name
    if op.domain:
        node.domain = op.domain
    if op.doc_string:
        node.doc_string = op.doc_string
    if op.overload:
        node.overload = op.overload
    for key, value in op.metadata_props:
        entry = node.metadata_props.add()
        entry.key, entry.value = key, value
    data = graph._g.nodes[op]
    node.input.extend(v.name if v is not None else "" for v in graph.inputs_of(op))
    outputs = graph.outputs_of(op)
    outputs += [None] * (data.get("n_out", 0) - len(outputs))  # trailing omitted optional outputs
    node.output.extend(v.name if v is not None else "" for v in outputs)
    order = data.get("attr_order", [])
    names = [n for n in order if n in op.attributes or n in op.subgraphs]
    names += sorted(n for n in (*op.attributes, *op.subgraphs) if n not in names)
    for name in names:
        if name in op.attributes:
            node.attribute.append(op.attributes[name])
        else:
            sub = op.subgraphs[name]
            attr = node.attribute.add()
            attr.name = name
            if isinstance(sub, list):
                attr.type = onnx.AttributeProto.GRAPHS
                attr.graphs.extend(graph_to_proto(g) for g in sub)
            else:
                attr.type = onnx.AttributeProto.GRAPH
                attr.g.CopyFrom(graph_to_proto(sub))
    if data.get("device_configurations"):
        node.device_configurations.extend(data["device_configurations"])
    return node


def model_header(graph: Graph) -> onnx.ModelProto:
    info = graph.model or ModelInfo()
    model = onnx.ModelProto()
    model.ir_version = info.ir_version
    order = info.opset_order + sorted(d for d in info.opset_imports if d not in info.opset_order)
    for domain in order:
        if domain in info.opset_imports:
            entry = model.opset_import.add()
            entry.domain, entry.version = domain, info.opset_imports[domain]
    for attr in ("producer_name", "producer_version", "domain", "doc_string"):
        if getattr(info, attr):
            setattr(model, attr, getattr(info, attr))
    if info.model_version:
        model.model_version = info.model_version
    for key, value in info.metadata_props:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.functions.extend(info.functions)
    model.training_info.extend(info.training_info)
    if getattr(info, "configuration", None):
        model.configuration.extend(info.configuration)
    return model


def to_model_proto(graph: Graph) -> onnx.ModelProto:
    """The whole model in memory (weights copied into the proto)."""
    model = model_header(graph)
    model.graph.CopyFrom(graph_to_proto(graph))
    return model
