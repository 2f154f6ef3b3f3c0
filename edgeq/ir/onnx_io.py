"""Load ONNX into the IR and save it back, exactly and without copying weights.

Loading memory-maps the file and walks the protobuf wire format once to find each top-level
initializer's `raw_data` bytes; the model is parsed from a *skeleton* without those bytes, and
every weight becomes a zero-copy view of the map. External data files are mapped once each
(one file descriptor per file, however many tensors point into it). Saving streams the same
way in reverse: the skeleton is serialized by protobuf and each tensor's bytes follow it,
copied file to file by the kernel for weights still mapped from a loaded file and written
straight from the array otherwise, so neither direction holds a second copy of the weights
(nor, for an untouched model, even one: see tools/bench_io_memory.py).

What a load checks (each failure is an `edgeq.errors` subclass with a one-line message):
the file exists and is a complete ONNX protobuf (`ModelLoadError`), every initializer's bytes
match its type and shape and external data files exist and are long enough
(`ExternalDataError`), the opset is one the installed onnxruntime runs
(`UnsupportedOpsetError`), and the graph is well formed: one producer per value, no dangling
input, no cycle, in every nested graph too (`GraphError`). `edgeq.ir.verify` states the full
set of invariants.
"""

from __future__ import annotations

import functools
import mmap
import os
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import networkx as nx
import numpy as np
import onnx
from google.protobuf.message import DecodeError

from edgeq.errors import (
    EdgeqError,
    ExternalDataError,
    GraphError,
    ModelLoadError,
    OptionError,
    UnsupportedOpsetError,
)
from edgeq.ir.graph import Graph, ModelInfo, Op, Value
from edgeq.ir.tensor import (
    LEGAL_ELEM_TYPES,
    FileRegion,
    Tensor,
    elem_type_name,
    storage_nbytes,
)

# Protobuf field numbers (onnx/onnx.proto).
_MODEL_IR_VERSION = 1
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_TWO_GB = 2**31
# A model whose protobuf would come within this margin of 2 GB is saved with external data.
_INLINE_LIMIT = _TWO_GB - (64 << 20)
_PAGE = 4096

# ---- protobuf wire format ---------------------------------------------------------------


class _WireError(Exception):
    """The bytes are not a well-formed protobuf; `truncated` when a field runs past the end."""

    def __init__(self, message: str, truncated: bool = False):
        super().__init__(message)
        self.truncated = truncated


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _WireError("a varint runs past the end of its message", truncated=True)
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _WireError(f"invalid protobuf varint at byte {pos}")


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
            raise _WireError(f"protobuf wire type {wire} at byte {field_start}")
        if number == 0:
            raise _WireError(f"protobuf field number 0 at byte {field_start}")
        if payload_end > end:
            raise _WireError(f"field {number} at byte {field_start} needs {payload_end - field_start} bytes, "
                             f"{end - field_start} remain", truncated=True)
        yield number, wire, field_start, pos, payload_end
        pos = payload_end


class _FileReader:
    """Random access to a file's bytes through pread, in windows.

    The wire walk reads the file this way rather than through the memory map: pages touched
    through a mapping join this process's RSS (the kernel maps whole large folios, megabytes,
    around each fault), pages read by pread only visit the page cache.
    """

    _WINDOW = 1 << 16

    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.size = size
        self._base = 0
        self._buf = b""

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, pos: int) -> int:
        offset = pos - self._base
        if not 0 <= offset < len(self._buf):
            if not 0 <= pos < self.size:
                raise IndexError(pos)
            self._base, self._buf = pos, os.pread(self.fd, self._WINDOW, pos)
            offset = 0
        return self._buf[offset]

    def read(self, start: int, end: int) -> bytes:
        if self._base <= start and end <= self._base + len(self._buf):
            return self._buf[start - self._base:end - self._base]
        parts = []
        while start < end:
            part = os.pread(self.fd, end - start, start)
            if not part:
                raise _WireError("the file shrank while being read", truncated=True)
            parts.append(part)
            start += len(part)
        return b"".join(parts)


def _length_delimited_head(number: int, length: int) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(length)


def _split_raw_data(buf: _FileReader, size: int) -> tuple[bytes, list[tuple[int, int] | None]]:
    """The model's bytes without top-level initializer raw_data, and where each raw_data lies.

    Runs of untouched fields are read as single pieces; the skeleton is joined once.
    """
    pieces: list[bytes] = []
    ranges: list[tuple[int, int] | None] = []
    for number, wire, fstart, start, end in _fields(buf, 0, size):
        if number != _MODEL_GRAPH or wire != 2:
            pieces.append(buf.read(fstart, end))
            continue
        graph: list[bytes] = []
        run = start
        for gnum, gwire, gfstart, gstart, gend in _fields(buf, start, end):
            if gnum != _GRAPH_INITIALIZER or gwire != 2:
                continue
            graph.append(buf.read(run, gfstart))
            run = gend
            tensor: list[bytes] = []
            raw = None
            trun = gstart
            for tnum, twire, tfstart, tstart, tend in _fields(buf, gstart, gend):
                if tnum == _TENSOR_RAW_DATA and twire == 2:
                    tensor.append(buf.read(trun, tfstart))
                    trun = tend
                    raw = (tstart, tend - tstart)
            tensor.append(buf.read(trun, gend))
            ranges.append(raw)
            graph.append(_length_delimited_head(_GRAPH_INITIALIZER, sum(len(p) for p in tensor)))
            graph.extend(tensor)
        graph.append(buf.read(run, end))
        pieces.append(_length_delimited_head(_MODEL_GRAPH, sum(len(p) for p in graph)))
        pieces.extend(graph)
    return b"".join(pieces), ranges


# ---- load -----------------------------------------------------------------------------


def load(source: str | os.PathLike | onnx.ModelProto, *, check_runtime: bool = True) -> Graph:
    """Load an ONNX model (path or ModelProto) into a Graph. The source is never modified.

    `check_runtime`: refuse a model whose opset the installed onnxruntime does not run.
    """
    if isinstance(source, onnx.ModelProto):
        model, ranges, file_map, model_file, base_dir, where = source, None, None, None, None, "model"
    else:
        path = Path(source)
        model, ranges, file_map, model_file = _read_file(path)
        base_dir, where = path.parent, str(path)
    try:
        _check_model_header(model)
        info = _model_info(model)
        if check_runtime:
            check_runtime_support(info)
        graph = graph_from_proto(model.graph, model=info, raw=(file_map, ranges, model_file), base_dir=base_dir,
                                 _owned=base_dir is not None)
        check_structure(graph)
    except EdgeqError as err:
        raise type(err)(f"{where}: {err.problem}", fix=err.fix) from None
    return graph


def read_skeleton(path: str | os.PathLike) -> onnx.ModelProto:
    """The model proto of the file at `path` without its initializers' bytes (names, dtypes and
    dims stay): graph inputs, outputs and nodes for the cost of the file's structure, not its
    weights (onnx.load reads inline weights even with load_external_data=False)."""
    path = Path(path)
    size = _model_file_size(path)
    with open(path, "rb") as model_file:
        model, _ = _parse_skeleton(path, _FileReader(model_file.fileno(), size))
    return model


def _model_file_size(path: Path) -> int:
    """The size of the model file at `path`, or a ModelLoadError saying why it is none."""
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}", fix="check the path")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, not an ONNX file", fix="pass the .onnx file inside it")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path} is empty, not an ONNX model")
    return size


def _read_file(path: Path):
    size = _model_file_size(path)
    # The file stays open as long as its tensors live: saves copy their bytes from this very
    # inode (file to file, in the kernel), even after the path is replaced.
    model_file = open(path, "rb")  # noqa: SIM115 (closed when its tensors are gone)
    try:
        model, ranges = _parse_skeleton(path, _FileReader(model_file.fileno(), size))
        file_map = mmap.mmap(model_file.fileno(), 0, access=mmap.ACCESS_READ)
    except BaseException:
        model_file.close()
        raise
    return model, ranges, _mapped(file_map), model_file


# Every live memory map of model or external-data files, so that release_file_pages() can drop
# their resident pages: weights a pass has read (and replaced) would otherwise stay in RSS.
_LIVE_MAPS: list[weakref.ref] = []


def _mapped(file_map: mmap.mmap) -> np.ndarray:
    array = np.frombuffer(file_map, dtype=np.uint8)
    _LIVE_MAPS.append(weakref.ref(array))
    return array


def release_file_pages() -> None:
    """Drop the resident pages of every mapped weight file from this process (MADV_DONTNEED on
    read-only file mappings: a later read faults them back in from the page cache, unchanged)."""
    alive = []
    for ref in _LIVE_MAPS:
        array = ref()
        if array is None:
            continue
        alive.append(ref)
        base = array.base.obj if isinstance(array.base, memoryview) else array.base
        if isinstance(base, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED") and len(base):
            base.madvise(mmap.MADV_DONTNEED)
    _LIVE_MAPS[:] = alive


def _parse_skeleton(path: Path, reader: _FileReader) -> tuple[onnx.ModelProto, list]:
    try:
        skeleton, ranges = _split_raw_data(reader, reader.size)
        model = onnx.ModelProto()
        model.ParseFromString(skeleton)
    except _WireError as err:
        if err.truncated and _looks_like_onnx(reader):
            raise ModelLoadError(f"{path} is truncated ({err})", fix="re-download or re-export the model") from None
        raise ModelLoadError(f"{path} is not an ONNX model ({err})", fix="pass a .onnx file") from None
    except (DecodeError, RuntimeError, ValueError) as err:
        raise ModelLoadError(f"{path} is not an ONNX model ({_one_line(err)})", fix="pass a .onnx file") from None
    return model, ranges


def _looks_like_onnx(reader: _FileReader) -> bool:
    """ONNX files start with ir_version (field 1, varint) as protobuf writes fields in order."""
    head = reader.read(0, min(2, reader.size))
    return len(head) == 2 and head[0] == (_MODEL_IR_VERSION << 3 | 0) and 0 < head[1] < 0x80


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _check_model_header(model: onnx.ModelProto) -> None:
    if model.ir_version <= 0:
        raise ModelLoadError("not an ONNX model (it has no IR version)", fix="pass a .onnx file")
    if not model.HasField("graph"):
        raise ModelLoadError("the model has no graph (the file is truncated or is not an ONNX model)",
                             fix="re-download or re-export the model")
    if model.ir_version >= 3 and not len(model.opset_import):
        raise ModelLoadError("the model has no opset_import (the file is truncated or incomplete)",
                             fix="re-download or re-export the model")


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
        configuration=list(getattr(model, "configuration", ())),
    )


class _ExternalFiles:
    """External data files of one load, each memory-mapped once, read-only."""

    def __init__(self, base_dir: Path | None):
        self.base_dir = base_dir
        self._maps: dict[Path, tuple[np.ndarray, BinaryIO | None]] = {}

    def bytes_of(self, proto: onnx.TensorProto) -> np.ndarray:
        """The external bytes of `proto` as a zero-copy uint8 view, checked against its shape."""
        return self.region_of(proto)[0]

    def region_of(self, proto: onnx.TensorProto) -> tuple[np.ndarray, FileRegion | None]:
        """The external bytes of `proto` (a zero-copy view) and where they lie in their file."""
        name = proto.name or "<unnamed>"
        entries = {e.key: e.value for e in proto.external_data}
        location = entries.get("location", "")
        if self.base_dir is None:
            raise ExternalDataError(f"tensor {name!r} has external data but the model was given in memory",
                                    fix="load the model from its file path")
        if not location:
            raise ExternalDataError(f"tensor {name!r} is marked external but names no data file")
        if Path(location).is_absolute() or ".." in Path(location).parts:
            raise ExternalDataError(f"tensor {name!r} has an external data location outside the model's folder: "
                                    f"{location!r}")
        expected = storage_nbytes(proto.data_type, tuple(proto.dims))
        if expected is None:
            raise ExternalDataError(f"string tensor {name!r} cannot be stored as external data")
        try:
            offset = int(entries.get("offset", 0))
            length = int(entries["length"]) if "length" in entries else expected
        except ValueError:
            raise ExternalDataError(f"tensor {name!r} has a non-numeric external data offset or length") from None
        if offset < 0 or length != expected:
            raise ExternalDataError(f"tensor {name!r}: external data length {length} (offset {offset}) does not fit "
                                    f"its {elem_type_name(proto.data_type)} shape {list(proto.dims)} "
                                    f"({expected} bytes)", fix="re-export the model with its data file")
        path = self.base_dir / location
        data, file = self._map(path, name)
        if offset + length > len(data):
            raise ExternalDataError(f"external data file {path} is too short for tensor {name!r} "
                                    f"(needs bytes {offset}..{offset + length}, the file has {len(data)})",
                                    fix="re-download the model with its complete data file")
        region = FileRegion(file, offset, length) if file is not None and length else None
        return data[offset:offset + length], region

    def _map(self, path: Path, name: str) -> tuple[np.ndarray, BinaryIO | None]:
        key = path.resolve()
        if key not in self._maps:
            if not path.is_file():
                raise ExternalDataError(f"external data file missing: {path} (needed by tensor {name!r})",
                                        fix="keep the data file next to the model")
            f = open(path, "rb")  # noqa: SIM115 (held open by the tensors' FileRegions: one descriptor per file)
            if os.fstat(f.fileno()).st_size == 0:
                f.close()
                self._maps[key] = (np.zeros(0, dtype=np.uint8), None)
            else:
                self._maps[key] = (_mapped(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)), f)
        return self._maps[key]

    def inline(self, proto: onnx.TensorProto) -> None:
        """Make an external tensor proto (e.g. a Constant node's value) carry its bytes inline."""
        data = self.bytes_of(proto)
        proto.ClearField("external_data")
        proto.data_location = onnx.TensorProto.DEFAULT
        proto.raw_data = data.tobytes()


def _tensor_from_proto(proto: onnx.TensorProto, raw_view: np.ndarray | None, files: _ExternalFiles,
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
                     tensors: dict[str, Tensor] | None = None, _files: _ExternalFiles | None = None,
                     _owned: bool = False) -> Graph:
    """Build a Graph from a GraphProto. Nodes may come in any order (the IR sorts them).

    `outer_names`: names an enclosing graph defines (subgraphs read them as captures).
    `raw`: (file map, raw_data ranges[, open model file]) from the wire walk of a file.
    `tensors`: weights to reuse by initializer name (clone). `_owned`: the proto is edgeq's own
    parse of a file, so external Constant-node tensors may be inlined into it.
    """
    files = _files or _ExternalFiles(base_dir)
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
                  files: _ExternalFiles, owned: bool) -> Op:
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


def _inline_external_attribute(attr: onnx.AttributeProto, files: _ExternalFiles, owned: bool) -> None:
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


def check_structure(graph: Graph) -> None:
    """Raise GraphError if the graph or any nested graph has a cycle (captures included)."""
    if not nx.is_directed_acyclic_graph(graph._g):
        graph.topo_order()  # raises GraphError naming the ops on the cycle
    for op in graph.ops():
        for sub in op.subgraphs.values():
            for body in sub if isinstance(sub, list) else [sub]:
                check_structure(body)


@functools.cache
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
        except Exception:  # noqa: BLE001 (ORT's pybind errors share no base class)
            return False

    low, high = 13, 64
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if accepts(mid) else (low, mid - 1)
    return low


def check_runtime_support(info: ModelInfo) -> None:
    version = max((v for d, v in info.opset_imports.items() if d in ("", "ai.onnx")), default=0)
    if version > runtime_max_opset():
        import onnxruntime as ort

        raise UnsupportedOpsetError(
            f"the model uses ONNX opset {version}, newer than onnxruntime {ort.__version__} runs "
            f"(at most {runtime_max_opset()})", fix="upgrade onnxruntime or re-export at a lower opset")


# ---- save -----------------------------------------------------------------------------


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
    if getattr(info, "configuration", None):
        model.configuration.extend(info.configuration)
    return model


def to_model_proto(graph: Graph) -> onnx.ModelProto:
    """The whole model in memory (weights copied into the proto)."""
    model = _model_header(graph)
    model.graph.CopyFrom(graph_to_proto(graph))
    return model


def save(graph: Graph, path: str | os.PathLike, *, external_data: bool | None = None,
         external_threshold: int = 1024) -> Path:
    """Write `graph` to `path` atomically, streaming the weights (never a second copy of them).

    external_data: None = automatically when the model would pass protobuf's 2 GB limit;
    True = top-level tensors of at least `external_threshold` bytes go to `<file>.data` beside
    the model (page-aligned); False = everything inline (refused above 2 GB). Weights still
    mapped from a loaded file are copied file to file by the kernel (sendfile or
    copy_file_range), so they are not read into this process at all.
    """
    path = Path(path)
    header = _model_header(graph)
    graph_proto = graph_to_proto(graph, include_initializers=False)
    plan = [_plan_tensor(value) for value in graph.initializers]
    inline_size = header.ByteSize() + graph_proto.ByteSize() + sum(
        proto.ByteSize() + (len(data) + 16 if data is not None else 0) for proto, data, _ in plan)
    if external_data is None:
        external_data = inline_size >= _INLINE_LIMIT
    elif not external_data and inline_size >= _TWO_GB:
        raise OptionError(f"the model is {inline_size / 2**30:.2f} GiB, over protobuf's 2 GB limit for one file",
                          fix="save with external_data=True (or leave it to choose)")
    data_name = path.name + ".data"
    with _atomic(path) as model_file, (_atomic(path.with_name(data_name)) if external_data else _null()) as data_file:
        _write_model(_Writer(model_file), header, graph_proto, plan, graph,
                     _Writer(data_file) if data_file is not None else None, data_name, external_threshold)
    return path


_Piece = tuple[onnx.TensorProto, "memoryview | bytes | None", "FileRegion | None"]


def _plan_tensor(value: Value) -> _Piece:
    """(proto, bytes to stream as raw_data or None when the proto carries its own data, the
    file region those bytes can be copied from)."""
    tensor = value.const
    if tensor.elem_type == onnx.TensorProto.STRING or tensor.has_typed_storage():
        return tensor.to_proto(value.name), None, None
    return tensor.header_proto(value.name), tensor.raw_bytes(), tensor.file_region


def _write_model(out: _Writer, header: onnx.ModelProto, graph_proto: onnx.GraphProto, plan: list[_Piece],
                 graph: Graph, data_file: _Writer | None, data_name: str, threshold: int) -> None:
    # Field order inside a message does not matter to protobuf, so the model is written as
    # [header fields] [graph: initializers with their data streamed, then the other fields].
    pieces: list[_Piece] = []
    for (proto, data, region), value in zip(plan, graph.initializers):
        tensor = value.const
        if (data is None and data_file is not None and tensor.elem_type != onnx.TensorProto.STRING
                and tensor.nbytes >= threshold):
            # A large typed-field tensor goes external as raw bytes (same values).
            proto, data, region = tensor.header_proto(value.name), tensor.raw_bytes(), None
        if data_file is not None and data is not None and len(data) >= threshold:
            proto.data_location = onnx.TensorProto.EXTERNAL
            offset = data_file.position
            for key, val in (("location", data_name), ("offset", str(offset)), ("length", str(len(data)))):
                entry = proto.external_data.add()
                entry.key, entry.value = key, val
            data_file.write_tensor(data, region)
            data_file.write(b"\0" * ((-data_file.position) % _PAGE))  # page-align the next tensor: it maps cheaply
            pieces.append((proto, None, None))
        else:
            pieces.append((proto, data, region))

    def tensor_header(proto: onnx.TensorProto, data) -> bytes:
        head = proto.SerializeToString(deterministic=True)
        if data is None:
            return head
        return head + _length_delimited_head(_TENSOR_RAW_DATA, len(data))

    graph_head = graph_proto.SerializeToString(deterministic=True)
    init_heads = [tensor_header(proto, data) for proto, data, _ in pieces]
    init_sizes = [len(h) + (len(d) if d is not None else 0) for h, (_, d, _) in zip(init_heads, pieces)]
    graph_len = len(graph_head) + sum(len(_length_delimited_head(_GRAPH_INITIALIZER, s)) + s for s in init_sizes)
    header.ClearField("graph")
    out.write(header.SerializeToString(deterministic=True))
    out.write(_length_delimited_head(_MODEL_GRAPH, graph_len))
    for head, size, (_, data, region) in zip(init_heads, init_sizes, pieces):
        out.write(_length_delimited_head(_GRAPH_INITIALIZER, size) + head)
        if data is not None:
            out.write_tensor(data, region)
    out.write(graph_head)
    out.flush()
    if data_file is not None:
        data_file.flush()


class _Writer:
    """An unbuffered file with small writes gathered, large ones written straight from their
    buffers, and untouched weights copied from their source file by the kernel."""

    _GATHER = 1 << 20
    _CHUNK = 64 << 20

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.position = 0
        self._pending = bytearray()

    def write(self, data: bytes | memoryview) -> None:
        if len(data) < self._GATHER:
            self._pending += data
        else:
            self.flush()
            self._write_all(memoryview(data).cast("B"))
        self.position += len(data)

    def write_tensor(self, data: memoryview | bytes, region: FileRegion | None) -> None:
        """Write a tensor's bytes; those of a file region never pass through its mapping."""
        if region is None or len(data) != region.length:
            self.write(data)
            return
        if region.length < self._GATHER:
            self.write(_pread_all(region))
            return
        self.flush()
        done = _kernel_copy(region, self.raw.fileno())
        if done < region.length:  # no kernel copy here: write the rest from the mapped view
            self._write_all(memoryview(data).cast("B")[done:])
        self.position += region.length

    def flush(self) -> None:
        if self._pending:
            self._write_all(memoryview(self._pending))
            self._pending = bytearray()

    def _write_all(self, view: memoryview) -> None:
        for start in range(0, len(view), self._CHUNK):
            piece = view[start:start + self._CHUNK]
            while len(piece):
                written = self.raw.write(piece)
                piece = piece[written:]


def _pread_all(region: FileRegion) -> bytes:
    data = os.pread(region.file.fileno(), region.length, region.offset)
    while len(data) < region.length:
        more = os.pread(region.file.fileno(), region.length - len(data), region.offset + len(data))
        if not more:
            raise ModelLoadError(f"{getattr(region.file, 'name', 'a source file')} changed on disk after it was "
                                 "loaded (it is now too short)", fix="load the model again")
        data += more
    return data


def _kernel_copy(region: FileRegion, dst_fd: int) -> int:
    """Copy `region` to the current position of `dst_fd` inside the kernel; return the bytes
    copied (fewer than asked when neither sendfile nor copy_file_range works here)."""
    src_fd = region.file.fileno()
    if os.fstat(src_fd).st_size < region.offset + region.length:
        raise ModelLoadError(f"{getattr(region.file, 'name', 'a source file')} changed on disk after it was loaded "
                             "(it is now too short)", fix="load the model again")
    done = 0
    # sendfile first: as fast on dense files and far faster on sparse ones (ext4 measured).
    for copy in (_sendfile, _copy_file_range):
        while done < region.length:
            try:
                n = copy(src_fd, dst_fd, region.length - done, region.offset + done)
            except OSError:
                break
            if n <= 0:
                break
            done += n
        if done == region.length:
            break
    return done


def _copy_file_range(src_fd: int, dst_fd: int, count: int, offset: int) -> int:
    if not hasattr(os, "copy_file_range"):
        raise OSError("copy_file_range is unavailable")
    return os.copy_file_range(src_fd, dst_fd, min(count, 1 << 30), offset)


def _sendfile(src_fd: int, dst_fd: int, count: int, offset: int) -> int:
    if not hasattr(os, "sendfile"):
        raise OSError("sendfile is unavailable")
    return os.sendfile(dst_fd, src_fd, offset, min(count, 1 << 30))


@contextmanager
def _atomic(path: Path):
    """Write to a temp file beside `path`, rename into place only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@functools.cache
def _umask() -> int:
    """The process umask (mkstemp creates 0600 files; saved models get the usual mode)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def _null():
    yield None
