"""The protobuf wire format, the part edgeq reads itself in ONNX files: a field
scanner, a pread-based file reader, and the split of a model file into its *skeleton* (every
byte but the top-level initializers' raw_data) and where each raw_data lies in the file.

Loading parses only the skeleton with protobuf and maps the weights (`edgeq.ir.loader`);
saving writes the same field heads around streamed weights (`edgeq.ir.writer`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

# Protobuf field numbers (onnx/onnx.proto).
MODEL_IR_VERSION = 1
MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
TENSOR_RAW_DATA = 9


class WireError(Exception):
    """The bytes are not a well-formed protobuf; `truncated` when a field runs past the end."""

    def __init__(self, message: str, truncated: bool = False):
        super().__init__(message)
        self.truncated = truncated


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise WireError("a varint runs past the end of its message", truncated=True)
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError(f"invalid protobuf varint at byte {pos}")


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


def fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
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
            raise WireError(f"protobuf wire type {wire} at byte {field_start}")
        if number == 0:
            raise WireError(f"protobuf field number 0 at byte {field_start}")
        if payload_end > end:
            raise WireError(f"field {number} at byte {field_start} needs {payload_end - field_start} bytes, "
                             f"{end - field_start} remain", truncated=True)
        yield number, wire, field_start, pos, payload_end
        pos = payload_end


class FileReader:
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
                raise WireError("the file shrank while being read", truncated=True)
            parts.append(part)
            start += len(part)
        return b"".join(parts)


def length_delimited_head(number: int, length: int) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(length)


def split_raw_data(buf: FileReader, size: int) -> tuple[bytes, list[tuple[int, int] | None]]:
    """The model's bytes without top-level initializer raw_data, and where each raw_data lies.

    Runs of untouched fields are read as single pieces; the skeleton is joined once.
    """
    pieces: list[bytes] = []
    ranges: list[tuple[int, int] | None] = []
    for number, wire, fstart, start, end in fields(buf, 0, size):
        if number != MODEL_GRAPH or wire != 2:
            pieces.append(buf.read(fstart, end))
            continue
        graph: list[bytes] = []
        run = start
        for gnum, gwire, gfstart, gstart, gend in fields(buf, start, end):
            if gnum != GRAPH_INITIALIZER or gwire != 2:
                continue
            graph.append(buf.read(run, gfstart))
            run = gend
            tensor: list[bytes] = []
            raw = None
            trun = gstart
            for tnum, twire, tfstart, tstart, tend in fields(buf, gstart, gend):
                if tnum == TENSOR_RAW_DATA and twire == 2:
                    tensor.append(buf.read(trun, tfstart))
                    trun = tend
                    raw = (tstart, tend - tstart)
            tensor.append(buf.read(trun, gend))
            ranges.append(raw)
            graph.append(length_delimited_head(GRAPH_INITIALIZER, sum(len(p) for p in tensor)))
            graph.extend(tensor)
        graph.append(buf.read(run, end))
        pieces.append(length_delimited_head(MODEL_GRAPH, sum(len(p) for p in graph)))
        pieces.extend(graph)
    return b"".join(pieces), ranges


def looks_like_onnx(reader: FileReader) -> bool:
    """ONNX files start with ir_version (field 1, varint) as protobuf writes fields in order."""
    head = reader.read(0, min(2, reader.size))
    return len(head) == 2 and head[0] == (MODEL_IR_VERSION << 3 | 0) and 0 < head[1] < 0x80
