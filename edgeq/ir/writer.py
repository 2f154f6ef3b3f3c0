"""Save a Graph as ONNX, atomically and streaming the weights (never a second copy of them).

The skeleton is serialized by protobuf and each tensor's bytes follow it: copied file to file
by the kernel (sendfile or copy_file_range) for weights still mapped from a loaded file, and
written straight from the array otherwise, so neither loading nor saving holds a second copy
of the weights (nor, for an untouched model, even one: see tools/bench_io_memory.py). Models
that would pass protobuf's 2 GB limit go to external data, page-aligned in `<file>.data`.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import BinaryIO

import onnx

from edgeq.errors import ModelLoadError, OptionError
from edgeq.ir.files import atomic_write
from edgeq.ir.graph import Graph, Value
from edgeq.ir.tensor import FileRegion
from edgeq.ir.to_proto import graph_to_proto, model_header
from edgeq.ir.wire import GRAPH_INITIALIZER, MODEL_GRAPH, TENSOR_RAW_DATA, length_delimited_head

_TWO_GB = 2**31
# A model whose protobuf would come within this margin of 2 GB is saved with external data.
_INLINE_LIMIT = _TWO_GB - (64 << 20)
_PAGE = 4096


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
    header = model_header(graph)
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
    data_file_context = atomic_write(path.with_name(data_name)) if external_data else nullcontext()
    with atomic_write(path) as model_file, data_file_context as data_file:
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
        return head + length_delimited_head(TENSOR_RAW_DATA, len(data))

    graph_head = graph_proto.SerializeToString(deterministic=True)
    init_heads = [tensor_header(proto, data) for proto, data, _ in pieces]
    init_sizes = [len(h) + (len(d) if d is not None else 0) for h, (_, d, _) in zip(init_heads, pieces)]
    graph_len = len(graph_head) + sum(len(length_delimited_head(GRAPH_INITIALIZER, s)) + s for s in init_sizes)
    header.ClearField("graph")
    out.write(header.SerializeToString(deterministic=True))
    out.write(length_delimited_head(MODEL_GRAPH, graph_len))
    for head, size, (_, data, region) in zip(init_heads, init_sizes, pieces):
        out.write(length_delimited_head(GRAPH_INITIALIZER, size) + head)
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
