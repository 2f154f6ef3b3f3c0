"""ONNX protos -> Graph: build a Graph from a GraphProto (nested graphs included), the
ModelInfo of a ModelProto, and `clone_graph`, a structural copy made through the Graph's own
proto that shares its weight Tensors.

Weights are never copied: inline raw_data arrives as views of the mapped model file (from
`edgeq.ir.loader`), external data as views of mapped data files (`edgeq.ir.files`), and
typed-field tensors keep their proto. Building checks what a proto can get wrong: duplicate
definitions, two producers of a value, dangling inputs, and initializers whose bytes do not
match their type and shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from edgeq.errors import ExternalDataError, GraphError, ModelLoadError
from edgeq.ir.files import ExternalData
from edgeq.ir.graph import Graph, ModelInfo, Op, Value
from edgeq.ir.tensor import LEGAL_ELEM_TYPES, FileRegion, Tensor, elem_type_name, storage_nbytes
from edgeq.ir.to_proto import graph_to_proto


def clone_graph(graph: Graph) -> Graph:
    """A structural copy of `graph` that shares its weight Tensors (they are immutable)."""
    proto = graph_to_proto(graph, with_data=False)
    tensors = {v.name: v.const for v in graph.initializers}
    return graph_from_proto(proto, model=_model_info_copy(graph.model), tensors=tensors)


def model_info_from_proto(model: onnx.ModelProto) -> ModelInfo:
    """What `model` carries besides its graph."""
    return ModelInfo(
        ir_version=model.ir_version,
        opset_imports={o.domain: o.version for o in model.opset_import},
        opset_order=[o.domain for o in model.opset_import],
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        domain=model.domain,
        model_version=model.model_version,
        doc_string=model.doc_string,
        metadata_props=[(p.key, p.value) for p in model.metadata_props],
        functions=list(model.functions),
        training_info=list(model.training_info),
        configuration=list(getattr(model, "configuration", ())),
    )


def _tensor_from_proto(proto: onnx.TensorProto, raw_view: np.ndarray | None, files: ExternalData,
                       region: FileRegion | None = None) -> Tensor:
    name = proto.name
    if proto.data_type not in LEGAL_ELEM_TYPES:
        raise ModelLoadError(f"initializer {name!r} has an invalid data type "
                             f"({elem_type_name(proto.data_type)})", fix="the model is malformed; re-export it")
    if any(d < 0 for d in proto.dims):
        raise ModelLoadError(f"initializer {name!r} has a negative dimension in its shape {list(proto.dims)}")
    meta = tuple((p.key, p.value) for p in proto.metadata_props)
    common = {"doc_string": proto.doc_string, "metadata_props": meta}
    dims = tuple(proto.dims)
    if proto.data_location == onnx.TensorProto.EXTERNAL:
        raw, region = files.region_of(proto)
        return Tensor(proto.data_type, dims, raw=raw, region=region, **common)
    if raw_view is not None:
        expected = storage_nbytes(proto.data_type, dims)
        if expected is None or len(raw_view) != expected:
            raise ModelLoadError(f"initializer {name!r} holds {len(raw_view)} bytes of raw_data but its "
                                 f"{elem_type_name(proto.data_type)} shape {list(dims)} needs {expected}",
                                 fix="the model is malformed; re-export it")
        return Tensor(proto.data_type, dims, raw=raw_view, region=region, **common)
    # Typed fields (float_data, int32_data, string_data...) or an in-memory proto's raw_data:
    # kept as the proto, decoded on first use, re-emitted unchanged.
    return Tensor(proto.data_type, dims, proto=proto, **common)


def graph_from_proto(proto: onnx.GraphProto, *, model: ModelInfo | None = None,
                     raw: tuple = (None, None),
                     base_dir: Path | None = None, outer_names: frozenset[str] = frozenset(),
                     tensors: dict[str, Tensor] | None = None, _files: ExternalData | None = None,
                     _owned: bool = False) -> Graph:
    """Build a Graph from a GraphProto. Nodes may come in any order (the IR sorts them).

    `outer_names`: names an enclosing graph defines (subgraphs read them as captures).
    `raw`: (file map, raw_data ranges[, open model file]) from the wire walk of a file.
    `tensors`: weights to reuse by initializer name (clone). `_owned`: the proto is edgeq's own
    parse of a file, so external Constant-node tensors may be inlined into it.
    """
    files = _files or ExternalData(base_dir)
    graph = Graph(proto.name, model)
    graph.doc_string = proto.doc_string
    graph.metadata_props = tuple((p.key, p.value) for p in proto.metadata_props)
    graph.sparse_initializers = list(proto.sparse_initializer)
    graph.quantization_annotation = list(proto.quantization_annotation)
    file_map, ranges, model_file = (*raw, None)[:3]

    for index, init in enumerate(proto.initializer):
        if graph.has_value(init.name):
            raise GraphError(f"initializer {init.name!r} is defined twice in graph {graph.name!r}",
                             fix="the model is malformed; re-export it")
        raw_view = region = None
        if ranges is not None and ranges[index] is not None:
            offset, length = ranges[index]
            raw_view = file_map[offset:offset + length]
            region = FileRegion(model_file, offset, length) if model_file is not None and length else None
        if tensors and init.name in tensors:
            tensor = tensors[init.name]
        else:
            tensor = _tensor_from_proto(init, raw_view, files, region)
        value = graph.add_value(Value(init.name, const=tensor))
        graph.initializers.append(value)
    input_names: set[str] = set()
    for vi in proto.input:
        if vi.name in input_names:
            raise GraphError(f"graph input {vi.name!r} is listed twice in graph {graph.name!r}",
                             fix="the model is malformed; re-export it")
        input_names.add(vi.name)
        value = graph.value(vi.name) if graph.has_value(vi.name) else graph.add_value(Value(vi.name))
        value.type, value.doc_string, value.metadata_props = _copy_type(vi), vi.doc_string, _meta(vi)
        graph.inputs.append(value)
    for sparse in proto.sparse_initializer:
        name = sparse.values.name
        if graph.has_value(name) and graph.value(name).const is not None:
            raise GraphError(f"sparse initializer {name!r} is defined twice in graph {graph.name!r}")
        if _owned:
            for part in (sparse.values, sparse.indices):
                if part.data_location == onnx.TensorProto.EXTERNAL:
                    files.inline(part)
        if not graph.has_value(name):
            graph.add_value(Value(name))

    # Pass 1: every op and the values it produces. Subgraphs see every name this graph
    # defines (acyclicity is checked on the finished graph, captures included).
    visible = frozenset(graph._values) | frozenset(o for n in proto.node for o in n.output if o) | outer_names
    sparse_names = {s.values.name for s in proto.sparse_initializer}
    built: list[tuple[Op, onnx.NodeProto]] = []
    for position, node in enumerate(proto.node):
        op = _op_from_node(node, graph, visible, base_dir, files, _owned)
        op.order = float(position)
        graph._g.add_node(op)
        data = graph._g.nodes[op]
        data["n_in"] = len(node.input)
        data["n_out"] = len(node.output)
        data["attr_order"] = [a.name for a in node.attribute]
        if len(getattr(node, "device_configurations", ())):
            data["device_configurations"] = list(node.device_configurations)
        for slot, name in enumerate(node.output):
            if not name:
                continue
            if graph.has_value(name):
                _raise_second_definition(graph, graph.value(name), op, sparse_names)
            graph._g.add_edge(op, graph.add_value(Value(name)), key=("out", slot))
        built.append((op, node))
    # Pass 2: wire every op's inputs and its subgraphs' captures.
    for op, node in built:
        for slot, name in enumerate(node.input):
            if name:
                graph._g.add_edge(_resolve(graph, name, op, outer_names), op, key=("in", slot))
        for name in _captured_names(op):
            graph._g.add_edge(_resolve(graph, name, op, outer_names), op, key=("implicit", name))

    for vi in proto.output:
        if not graph.has_value(vi.name):
            if vi.name in outer_names:
                graph.add_value(Value(vi.name, outer=True))
            else:
                raise GraphError(f"graph output {vi.name!r} of graph {graph.name!r} is produced by no node, "
                                 "input or initializer", fix="the model is malformed; re-export it")
        value = graph.value(vi.name)
        if not any(v is value for v in graph.inputs):
            value.type, value.doc_string, value.metadata_props = _copy_type(vi), vi.doc_string, _meta(vi)
        graph.outputs.append(value)
    graph.value_info_order = [vi.name for vi in proto.value_info]
    boundary = {v.name for v in graph.inputs} | {v.name for v in graph.outputs}
    for vi in proto.value_info:
        if not graph.has_value(vi.name) or vi.name in boundary:
            continue
        value = graph.value(vi.name)
        if value.type is None:
            value.type = _copy_type(vi)
        value.doc_string = value.doc_string or vi.doc_string
        value.metadata_props = value.metadata_props or _meta(vi)
    return graph


def _raise_second_definition(graph: Graph, existing: Value, op: Op, sparse_names: set[str]) -> None:
    name = existing.name
    first = graph.producer(existing)
    if first is op:
        raise GraphError(f"node {_label(op)} lists output {name!r} twice", fix="the model is malformed; re-export it")
    if first is not None:
        what = f"node {_label(first)} and node {_label(op)}"
    elif existing.const is not None or name in sparse_names:
        what = f"an initializer and node {_label(op)}"
    else:
        what = f"a graph input and node {_label(op)}"
    raise GraphError(f"value {name!r} has two producers in graph {graph.name!r}: {what}",
                     fix="the model is malformed; re-export it")


def _label(op: Op) -> str:
    return repr(op.name) if op.name else f"<{op.op_type}>"


def _meta(vi: onnx.ValueInfoProto) -> tuple[tuple[str, str], ...]:
    return tuple((p.key, p.value) for p in getattr(vi, "metadata_props", ()))


def _copy_type(vi: onnx.ValueInfoProto) -> onnx.TypeProto | None:
    if not vi.HasField("type"):
        return None
    t = onnx.TypeProto()
    t.CopyFrom(vi.type)
    return t


def _op_from_node(node: onnx.NodeProto, graph: Graph, visible: frozenset[str], base_dir: Path | None,
                  files: ExternalData, owned: bool) -> Op:
    attributes, subgraphs = {}, {}
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            subgraphs[attr.name] = graph_from_proto(attr.g, base_dir=base_dir, outer_names=visible,
                                                    _files=files, _owned=owned)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            subgraphs[attr.name] = [graph_from_proto(g, base_dir=base_dir, outer_names=visible,
                                                     _files=files, _owned=owned) for g in attr.graphs]
        else:
            _inline_external_attribute(attr, files, owned)
            attributes[attr.name] = attr
    return Op(node.op_type, node.domain, node.name, attributes=attributes, subgraphs=subgraphs,
              doc_string=node.doc_string, overload=getattr(node, "overload", ""),
              metadata_props=tuple((p.key, p.value) for p in node.metadata_props))


def _inline_external_attribute(attr: onnx.AttributeProto, files: ExternalData, owned: bool) -> None:
    """Constant-node tensors saved as external data (onnx's convert_attribute=True) are read in,
    so that saving elsewhere never leaves a reference to the source's data file."""
    tensors = [attr.t] if attr.HasField("t") else []
    tensors += list(attr.tensors)
    for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
        tensors += [sparse.values, sparse.indices]
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            if not owned:
                raise ExternalDataError(f"attribute {attr.name!r} holds external data but the model was given "
                                        "in memory", fix="load the model from its file path")
            files.inline(tensor)


def _resolve(graph: Graph, name: str, op: Op, outer_names: frozenset[str]) -> Value:
    if graph.has_value(name):
        return graph.value(name)
    if name in outer_names:
        return graph.add_value(Value(name, outer=True))
    raise GraphError(f"node {_label(op)} ({op.op_type}) reads {name!r}, which no node, graph input or initializer "
                     f"of graph {graph.name!r} defines (a dangling input)", fix="the model is malformed; re-export it")


def _captured_names(op: Op) -> list[str]:
    """Outer-scope names read by this op's subgraphs (transitively)."""
    names: list[str] = []
    for sub in op.subgraphs.values():
        for g in sub if isinstance(sub, list) else [sub]:
            names.extend(v.name for v in g.values() if v.outer and v.name not in names)
    return names


def _model_info_copy(info: ModelInfo | None) -> ModelInfo | None:
    if info is None:
        return None
    return ModelInfo(**{k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                        for k, v in info.__dict__.items()})
