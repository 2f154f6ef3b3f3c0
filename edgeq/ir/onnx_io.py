"""Load ONNX into the IR and save it back, exactly and without copying weights.

Loading memory-maps the file and walks the protobuf wire format once to find each
initializer's `raw_data` bytes; the model is parsed from a *skeleton* without those bytes, and
every weight becomes a zero-copy view of the map. Saving streams the same way in reverse:
the skeleton is serialized by protobuf and each tensor's bytes are written straight from its
array, so neither direction holds a second copy of the weights.
"""

from __future__ import annotations

import functools
import mmap
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from edgeq.errors import ExternalDataError, GraphError, ModelLoadError, UnsupportedOpsetError
from edgeq.ir.graph import Graph, ModelInfo, Op, Value
from edgeq.ir.tensor import Tensor

# Protobuf field numbers (onnx/onnx.proto).
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_TWO_GB = 2**31

# ---- protobuf wire format ---------------------------------------------------------------


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise ModelLoadError("the ONNX file is truncated (a field runs past the end of the file)")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ModelLoadError("not an ONNX model (invalid protobuf varint)")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield (field number, wire type, field start, payload start, payload end)."""
    pos = start
    while pos < end:
        field_start = pos
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, payload_end = _varint(buf, pos, end)
        elif wire == 1:
            payload_end = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            payload_end = pos + length
        elif wire == 5:
            payload_end = pos + 4
        else:
            raise ModelLoadError(f"not an ONNX model (protobuf wire type {wire} at byte {field_start})")
        if number == 0 or payload_end > end:
            raise ModelLoadError("the ONNX file is truncated or is not an ONNX model",
                                 fix="re-download or re-export the model")
        yield number, wire, field_start, pos, payload_end
        pos = payload_end


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def _split_raw_data(buf, size: int) -> tuple[bytes, list[tuple[int, int] | None]]:
    """The model's bytes without initializer raw_data, and where each raw_data lies."""
    skeleton = bytearray()
    ranges: list[tuple[int, int] | None] = []
    for number, wire, fstart, start, end in _fields(buf, 0, size):
        if number != _MODEL_GRAPH or wire != 2:
            skeleton += buf[fstart:end]
            continue
        graph = bytearray()
        for gnum, gwire, gfstart, gstart, gend in _fields(buf, start, end):
            if gnum != _GRAPH_INITIALIZER or gwire != 2:
                graph += buf[gfstart:gend]
                continue
            tensor = bytearray()
            raw = None
            for tnum, twire, tfstart, tstart, tend in _fields(buf, gstart, gend):
                if tnum == _TENSOR_RAW_DATA and twire == 2:
                    raw = (tstart, tend - tstart)
                else:
                    tensor += buf[tfstart:tend]
            ranges.append(raw)
            graph += _length_delimited(_GRAPH_INITIALIZER, bytes(tensor))
        skeleton += _length_delimited(_MODEL_GRAPH, bytes(graph))
    return bytes(skeleton), ranges


# ---- load -----------------------------------------------------------------------------


def load(source: str | os.PathLike | onnx.ModelProto, *, check_runtime: bool = True) -> Graph:
    """Load an ONNX model (path or ModelProto) into a Graph. The source is never modified."""
    if isinstance(source, onnx.ModelProto):
        model, ranges, file_map, base_dir = source, None, None, None
    else:
        path = Path(source)
        model, ranges, file_map = _read_file(path)
        base_dir = path.parent
    _check_model_header(model)
    info = _model_info(model)
    graph = graph_from_proto(model.graph, model=info, raw=(file_map, ranges), base_dir=base_dir)
    check_structure(graph)
    if check_runtime:
        check_runtime_support(info)
    return graph


def _read_file(path: Path):
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}", fix="check the path")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, not an ONNX file")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path} is empty, not an ONNX model")
    with open(path, "rb") as f:
        file_map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        skeleton, ranges = _split_raw_data(file_map, size)
        model = onnx.ModelProto()
        model.ParseFromString(skeleton)
    except ModelLoadError as err:
        raise ModelLoadError(f"{path}: {err.problem}", fix=err.fix) from None
    except (DecodeError, RuntimeError, ValueError) as err:
        raise ModelLoadError(f"{path} is not an ONNX model ({err})") from None
    return model, ranges, np.frombuffer(file_map, dtype=np.uint8)


def _check_model_header(model: onnx.ModelProto) -> None:
    if not model.HasField("graph") or model.ir_version <= 0:
        raise ModelLoadError("not an ONNX model (no graph or IR version)", fix="pass a .onnx file")


def _model_info(model: onnx.ModelProto) -> ModelInfo:
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
    )


def _tensor_from_proto(proto: onnx.TensorProto, raw_view: np.ndarray | None, base_dir: Path | None) -> Tensor:
    meta = tuple((p.key, p.value) for p in proto.metadata_props)
    common = dict(doc_string=proto.doc_string, metadata_props=meta)
    if proto.data_location == onnx.TensorProto.EXTERNAL:
        return Tensor(proto.data_type, tuple(proto.dims), raw=_map_external(proto, base_dir), **common)
    if raw_view is not None:
        return Tensor(proto.data_type, tuple(proto.dims), raw=raw_view, **common)
    if proto.HasField("raw_data"):
        # In-memory proto: decode on first use only (reading raw_data copies it).
        return Tensor(proto.data_type, tuple(proto.dims), proto=proto, **common)
    return Tensor(proto.data_type, tuple(proto.dims), proto=proto, **common)


def _map_external(proto: onnx.TensorProto, base_dir: Path | None) -> np.ndarray:
    entries = {e.key: e.value for e in proto.external_data}
    location = entries.get("location", "")
    if base_dir is None:
        raise ExternalDataError(f"tensor {proto.name!r} has external data but the model was given in memory",
                                fix="load it from its file path")
    path = (base_dir / location).resolve()
    if not location or Path(location).is_absolute() or ".." in Path(location).parts:
        raise ExternalDataError(f"tensor {proto.name!r} has an invalid external data location {location!r}")
    if not path.is_file():
        raise ExternalDataError(f"external data file missing: {path} (needed by tensor {proto.name!r})",
                                fix="keep the .data file next to the model")
    offset = int(entries.get("offset", 0))
    file_size = path.stat().st_size
    length = int(entries["length"]) if "length" in entries else file_size - offset
    if offset + length > file_size:
        raise ExternalDataError(f"external data file {path} is too short for tensor {proto.name!r}",
                                fix="re-export or re-download the model with its data file")
    if length == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(length,))


def graph_from_proto(proto: onnx.GraphProto, *, model: ModelInfo | None = None,
                     raw: tuple[np.ndarray | None, list | None] = (None, None),
                     base_dir: Path | None = None, outer_names: frozenset[str] = frozenset(),
                     tensors: dict[str, Tensor] | None = None) -> Graph:
    graph = Graph(proto.name, model)
    graph.doc_string = proto.doc_string
    graph.metadata_props = tuple((p.key, p.value) for p in proto.metadata_props)
    graph.sparse_initializers = list(proto.sparse_initializer)
    graph.quantization_annotation = list(proto.quantization_annotation)
    file_map, ranges = raw
    types = {vi.name: vi for vi in proto.value_info}
    graph.value_info_order = [vi.name for vi in proto.value_info]
    input_names = {vi.name for vi in proto.input}

    for index, init in enumerate(proto.initializer):
        raw_view = None
        if ranges is not None and ranges[index] is not None:
            offset, length = ranges[index]
            raw_view = file_map[offset:offset + length]
        tensor = tensors[init.name] if tensors and init.name in tensors else _tensor_from_proto(init, raw_view, base_dir)
        value = graph.add_value(Value(init.name, const=tensor))
        graph.initializers.append(value)
    for vi in proto.input:
        value = graph.value(vi.name) if graph.has_value(vi.name) else graph.add_value(Value(vi.name))
        value.type, value.doc_string = _copy_type(vi), vi.doc_string
        graph.inputs.append(value)
    for sparse in proto.sparse_initializer:
        graph.add_value(Value(sparse.values.name))

    defined = {v.name for v in graph.values()}
    for position, node in enumerate(proto.node):
        op = _op_from_node(node, graph, defined | outer_names, base_dir)
        op.order = float(position)
        _wire_node(graph, op, node, outer_names)
        defined.update(o for o in node.output if o)
    for vi in proto.output:
        if not graph.has_value(vi.name):
            if vi.name in outer_names:
                graph.add_value(Value(vi.name, outer=True))
            else:
                raise GraphError(f"graph output {vi.name!r} is produced by no node, input or initializer",
                                 fix="the model is malformed; re-export it")
        value = graph.value(vi.name)
        value.type, value.doc_string = _copy_type(vi), vi.doc_string or value.doc_string
        graph.outputs.append(value)
    for name, vi in types.items():
        if graph.has_value(name) and name not in input_names:
            value = graph.value(name)
            if value.type is None:
                value.type = _copy_type(vi)
            value.doc_string = value.doc_string or vi.doc_string
    return graph


def _copy_type(vi: onnx.ValueInfoProto) -> onnx.TypeProto | None:
    if not vi.HasField("type"):
        return None
    t = onnx.TypeProto()
    t.CopyFrom(vi.type)
    return t


def _op_from_node(node: onnx.NodeProto, graph: Graph, visible: set[str], base_dir: Path | None) -> Op:
    attributes, subgraphs = {}, {}
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            subgraphs[attr.name] = graph_from_proto(attr.g, base_dir=base_dir, outer_names=frozenset(visible))
        elif attr.type == onnx.AttributeProto.GRAPHS:
            subgraphs[attr.name] = [graph_from_proto(g, base_dir=base_dir, outer_names=frozenset(visible))
                                    for g in attr.graphs]
        else:
            attributes[attr.name] = attr
    return Op(node.op_type, node.domain, node.name, attributes=attributes, subgraphs=subgraphs,
              doc_string=node.doc_string, overload=getattr(node, "overload", ""),
              metadata_props=tuple((p.key, p.value) for p in node.metadata_props))


def _wire_node(graph: Graph, op: Op, node: onnx.NodeProto, outer_names: frozenset[str]) -> None:
    graph._g.add_node(op)
    graph._g.nodes[op]["n_in"] = len(node.input)
    graph._g.nodes[op]["attr_order"] = [a.name for a in node.attribute]
    for slot, name in enumerate(node.input):
        if not name:
            continue
        graph._g.add_edge(_resolve(graph, name, op, outer_names), op, key=("in", slot))
    for name in _captured_names(op):
        if graph.has_value(name) or name in outer_names:
            graph._g.add_edge(_resolve(graph, name, op, outer_names), op, key=("implicit", name))
    for slot, name in enumerate(node.output):
        if not name:
            continue
        if graph.has_value(name):
            existing = graph.value(name)
            if graph.producer(existing) is not None or existing.const is not None or existing in graph.inputs:
                raise GraphError(f"value {name!r} has two producers (second: node {node.name or node.op_type!r})",
                                 fix="the model is malformed; re-export it")
            value = existing
        else:
            value = graph.add_value(Value(name))
        graph._g.add_edge(op, value, key=("out", slot))


def _resolve(graph: Graph, name: str, op: Op, outer_names: frozenset[str]) -> Value:
    if graph.has_value(name):
        return graph.value(name)
    if name in outer_names:
        return graph.add_value(Value(name, outer=True))
    raise GraphError(f"node {op.name or op.op_type!r} reads {name!r}, which no node, input or initializer "
                     "defines before it (a dangling input or a cycle)", fix="the model is malformed; re-export it")


def _captured_names(op: Op) -> list[str]:
    """Outer-scope names read by this op's subgraphs (transitively)."""
    names: list[str] = []
    for sub in op.subgraphs.values():
        for g in sub if isinstance(sub, list) else [sub]:
            names.extend(v.name for v in g.values() if v.outer and v.name not in names)
    return names


def check_structure(graph: Graph) -> None:
    graph.topo_order()  # raises GraphError on a cycle


@functools.lru_cache(maxsize=None)
def runtime_max_opset() -> int:
    """The newest default-domain opset the installed onnxruntime accepts (probed once)."""
    import onnxruntime as ort
    from onnx import helper

    def accepts(version: int) -> bool:
        node = helper.make_node("Identity", ["x"], ["y"])
        vi = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in ("x", "y")]
        model = helper.make_model(helper.make_graph([node], "probe", vi[:1], vi[1:]),
                                  opset_imports=[helper.make_opsetid("", version)], ir_version=8)
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return True
        except Exception:
            return False

    low, high = 13, 64
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if accepts(mid) else (low, mid - 1)
    return low


def check_runtime_support(info: ModelInfo) -> None:
    import onnxruntime as ort

    version = max((v for d, v in info.opset_imports.items() if d in ("", "ai.onnx")), default=0)
    if version > runtime_max_opset():
        raise UnsupportedOpsetError(
            f"model uses ONNX opset {version}, newer than onnxruntime {ort.__version__} runs "
            f"(at most {runtime_max_opset()})", fix="upgrade onnxruntime or re-export at a lower opset")


# ---- save -----------------------------------------------------------------------------


def graph_to_proto(graph: Graph, *, with_data: bool = True) -> onnx.GraphProto:
    """The GraphProto of `graph`; top-level weights carry data only if `with_data`."""
    proto = onnx.GraphProto()
    proto.name = graph.name
    if graph.doc_string:
        proto.doc_string = graph.doc_string
    for key, value in graph.metadata_props:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
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
    return vi


def _value_infos(graph: Graph, ops: list[Op]) -> list[onnx.ValueInfoProto]:
    """value_info for typed intermediate values: first those the source had, in its order."""
    boundary = {v.name for v in graph.inputs} | {v.name for v in graph.outputs}
    seen: set[str] = set()
    infos = []
    for name in graph.value_info_order:
        if graph.has_value(name) and name not in boundary:
            value = graph.value(name)
            if value.type is not None or value.doc_string:
                infos.append(_value_info(value))
                seen.add(name)
    for op in ops:
        for value in graph.outputs_of(op):
            if value is not None and value.type is not None and value.name not in seen | boundary:
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
    node.input.extend(v.name if v is not None else "" for v in graph.inputs_of(op))
    node.output.extend(v.name if v is not None else "" for v in graph.outputs_of(op))
    order = graph._g.nodes[op].get("attr_order", [])
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
    return node


def _model_header(graph: Graph) -> onnx.ModelProto:
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
    return model


def to_model_proto(graph: Graph) -> onnx.ModelProto:
    """The whole model in memory (weights copied into the proto)."""
    model = _model_header(graph)
    model.graph.CopyFrom(graph_to_proto(graph))
    return model


def save(graph: Graph, path: str | os.PathLike, *, external_data: bool | None = None,
         external_threshold: int = 1024) -> Path:
    """Write `graph` to `path` atomically; weights stream from their arrays.

    external_data: None = automatically when the weights pass 2 GB; True = tensors of at least
    `external_threshold` bytes go to `<file>.data` beside the model.
    """
    path = Path(path)
    total = sum(v.const.nbytes for v in graph.initializers)
    if external_data is None:
        external_data = total >= _TWO_GB - (64 << 20)
    header = _model_header(graph)
    graph_proto = graph_to_proto(graph, with_data=False)
    data_name = path.name + ".data"
    with _atomic(path) as model_file, (_atomic(path.with_name(data_name)) if external_data else _null()) as data_file:
        _write_model(model_file, header, graph_proto, graph, data_file, data_name, external_threshold)
    return path


def _write_model(out: BinaryIO, header: onnx.ModelProto, graph_proto: onnx.GraphProto, graph: Graph,
                 data_file: BinaryIO | None, data_name: str, threshold: int) -> None:
    # Field order inside a message does not matter to protobuf, so the graph is written as
    # [graph fields without initializers] + [each initializer with its data streamed].
    initializers = list(graph_proto.initializer)
    graph_proto.ClearField("initializer")
    pieces: list[tuple[onnx.TensorProto, memoryview | bytes | None]] = []
    offset = 0
    for proto, value in zip(initializers, graph.initializers):
        tensor = value.const
        if tensor.has_typed_storage():
            pieces.append((proto, None))
            continue
        data = tensor.raw_bytes()
        if data_file is not None and len(data) >= threshold:
            proto.data_location = onnx.TensorProto.EXTERNAL
            for key, val in (("location", data_name), ("offset", str(offset)), ("length", str(len(data)))):
                entry = proto.external_data.add()
                entry.key, entry.value = key, val
            _write_chunks(data_file, data)
            pad = (-(offset + len(data))) % 4096  # page-align the next tensor so it maps cheaply
            data_file.write(b"\0" * pad)
            offset += len(data) + pad
            pieces.append((proto, None))
        else:
            pieces.append((proto, data))

    def tensor_header(proto: onnx.TensorProto, data) -> bytes:
        head = proto.SerializeToString(deterministic=True)
        if data is None:
            return head
        return head + _encode_varint(_TENSOR_RAW_DATA << 3 | 2) + _encode_varint(len(data))

    graph_head = graph_proto.SerializeToString(deterministic=True)
    init_heads = [tensor_header(proto, data) for proto, data in pieces]
    init_sizes = [len(h) + (len(d) if d is not None else 0) for h, (_, d) in zip(init_heads, pieces)]
    graph_len = len(graph_head) + sum(len(_encode_varint(_GRAPH_INITIALIZER << 3 | 2)) + len(_encode_varint(s)) + s
                                      for s in init_sizes)
    header.ClearField("graph")
    out.write(header.SerializeToString(deterministic=True))
    out.write(_encode_varint(_MODEL_GRAPH << 3 | 2) + _encode_varint(graph_len))
    for head, size, (_, data) in zip(init_heads, init_sizes, pieces):
        out.write(_encode_varint(_GRAPH_INITIALIZER << 3 | 2) + _encode_varint(size) + head)
        if data is not None:
            _write_chunks(out, data)
    out.write(graph_head)


def _write_chunks(out: BinaryIO, data: memoryview | bytes, chunk: int = 64 << 20) -> None:
    view = memoryview(data)
    for start in range(0, len(view), chunk):
        out.write(view[start:start + chunk])


@contextmanager
def _atomic(path: Path):
    """Write to a temp file beside `path`, rename into place only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def _null():
    yield None
