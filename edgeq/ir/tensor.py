"""Constant tensors (weights) of the IR, read lazily and never copied on load.

A `Tensor` holds its bytes in one of three ways: a slice of the memory-mapped model file
(inline `raw_data`), a memory-mapped external-data file, or a numpy array a pass built.
Mapped tensors also know their `FileRegion`, so saving copies them file to file in the kernel.
Tensors stored in typed proto fields (`float_data`, `int32_data`, strings) keep their proto
and are decoded on demand, so an untouched tensor is written back byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_dtypes  # noqa: F401  (registers int4/float8 numpy dtypes used by onnx helpers)
import numpy as np
import onnx
from onnx import helper, numpy_helper

# ONNX element types whose raw bytes are packed below one byte per element: bits per element.
# (Names absent from an older onnx are skipped.)
_PACKED_BITS = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2),
                       ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6))
    if hasattr(onnx.TensorProto, name)
}
_PACKED_TYPES = PACKED_TYPES = frozenset(_PACKED_BITS)

# Every element type a tensor may have (UNDEFINED excluded).
LEGAL_ELEM_TYPES = frozenset(v for k, v in onnx.TensorProto.DataType.items() if k != "UNDEFINED")


def np_dtype(elem_type: int) -> np.dtype:
    """numpy dtype of an ONNX element type (int4 and float8 through ml_dtypes)."""
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def elem_type_of(array: np.ndarray) -> int:
    return helper.np_dtype_to_tensor_dtype(array.dtype)


def elem_type_name(elem_type: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"<unknown data type {elem_type}>"


def storage_nbytes(elem_type: int, dims: tuple[int, ...]) -> int | None:
    """Bytes that `raw_data` of this type and shape holds (None for strings, which have no raw form)."""
    if elem_type == onnx.TensorProto.STRING:
        return None
    size = int(np.prod(dims, dtype=np.int64))
    bits = _PACKED_BITS.get(elem_type)
    if bits is not None:
        return (size * bits + 7) // 8
    return size * np_dtype(elem_type).itemsize


class FileRegion:
    """Where an untouched tensor's bytes lie in a file that is held open (the same inode that
    was mapped at load, even if the path is replaced later), so a save can have the kernel copy
    them file to file without reading them into this process."""

    __slots__ = ("file", "length", "offset")

    def __init__(self, file, offset: int, length: int):
        self.file = file        # an open binary file object, kept alive by the tensors using it
        self.offset = offset
        self.length = length

    def __repr__(self) -> str:
        return f"FileRegion({getattr(self.file, 'name', '?')!r}, {self.offset}, {self.length})"


class Tensor:
    """An immutable constant tensor; passes that change a weight build a new one."""

    __slots__ = (
        "_array",
        "_loader",
        "_proto",
        "_raw",
        "_region",
        "dims",
        "doc_string",
        "elem_type",
        "metadata_props",
    )

    def __init__(
        self,
        elem_type: int,
        dims: tuple[int, ...],
        *,
        raw: np.ndarray | None = None,
        array: np.ndarray | None = None,
        proto: onnx.TensorProto | None = None,
        loader: Callable[[], np.ndarray] | None = None,
        region: FileRegion | None = None,
        doc_string: str = "",
        metadata_props: tuple[tuple[str, str], ...] = (),
    ):
        self.elem_type = elem_type
        self.dims = tuple(int(d) for d in dims)
        self._raw = raw          # uint8 view of little-endian bytes (file map), never copied
        self._array = array      # decoded array (set for tensors built by passes)
        self._proto = proto      # original proto for typed-field storage, re-emitted unchanged
        self._loader = loader    # deferred decode of a proto held elsewhere
        self._region = region    # where `raw` lies in its (open) file, for kernel-side copies
        self.doc_string = doc_string
        self.metadata_props = metadata_props

    @classmethod
    def from_array(cls, array: np.ndarray) -> Tensor:
        array = np.asarray(array)
        return cls(elem_type_of(array), array.shape, array=array)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.dims

    @property
    def dtype(self) -> np.dtype:
        return np_dtype(self.elem_type)

    @property
    def size(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes as stored in ONNX (packed types count their packed size)."""
        if self._raw is not None:
            return int(self._raw.nbytes)
        if self.elem_type == onnx.TensorProto.STRING:
            return sum(len(s) for s in self.numpy().ravel())
        return storage_nbytes(self.elem_type, self.dims)

    def numpy(self) -> np.ndarray:
        """The tensor as a numpy array: a zero-copy view where the storage allows it."""
        if self._array is not None:
            return self._array
        if self._raw is not None and self.elem_type not in _PACKED_TYPES:
            return self._raw.view(self.dtype).reshape(self.dims)
        if self._raw is not None:
            # Packed 2/4/6-bit: let onnx unpack them from a proto carrying the raw bytes.
            proto = self._header_proto("t")
            proto.raw_data = self._raw.tobytes()
            return numpy_helper.to_array(proto)
        if self._loader is not None:
            return self._loader()
        assert self._proto is not None
        return numpy_helper.to_array(self._proto)

    def raw_bytes(self) -> memoryview | bytes:
        """Little-endian bytes as ONNX `raw_data` stores them."""
        if self._raw is not None:
            return memoryview(self._raw)
        if self.elem_type == onnx.TensorProto.STRING:
            raise TypeError("string tensors have no raw bytes; they are stored in string_data")
        array = self.numpy()
        if self.elem_type in _PACKED_TYPES:
            return numpy_helper.from_array(array).raw_data
        return memoryview(np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))).cast("B")

    def header_proto(self, name: str) -> onnx.TensorProto:
        """The TensorProto of this tensor without any data (name, type, dims, doc, metadata)."""
        return self._header_proto(name)

    def _header_proto(self, name: str) -> onnx.TensorProto:
        proto = onnx.TensorProto()
        proto.name = name
        proto.data_type = self.elem_type
        proto.dims.extend(self.dims)
        if self.doc_string:
            proto.doc_string = self.doc_string
        for key, value in self.metadata_props:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        return proto

    @property
    def file_region(self) -> FileRegion | None:
        """The file bytes this tensor's raw data is a view of (None for built or typed tensors)."""
        return self._region if self._raw is not None else None

    def has_typed_storage(self) -> bool:
        """True when the tensor came from typed proto fields and is re-emitted as they were."""
        return self._proto is not None and self._raw is None and self._array is None

    def to_proto(self, name: str, *, with_data: bool = True) -> onnx.TensorProto:
        if self.has_typed_storage():
            proto = onnx.TensorProto()
            proto.CopyFrom(self._proto)
            proto.name = name
            return proto
        proto = self._header_proto(name)
        if with_data:
            if self.elem_type == onnx.TensorProto.STRING:
                proto.string_data.extend(s if isinstance(s, bytes) else str(s).encode("utf-8")
                                         for s in self.numpy().ravel())
            else:
                proto.raw_data = bytes(self.raw_bytes())
        return proto

    def __repr__(self) -> str:
        return f"Tensor({onnx.TensorProto.DataType.Name(self.elem_type)}, {list(self.dims)})"
