"""The files the IR reads and writes: atomic writes, read-only memory maps, external data.

- `atomic_write` writes to a temp file beside the destination and renames it into place only
  on success; the result gets the usual mode for new files (0666 less the umask), not the
  0600 of a temp file. Models (`edgeq.ir.writer`) and reports both write through it.
- `map_file` maps a file read-only and registers the map, so that `release_file_pages` can
  drop the resident pages of every mapped weight file at once.
- `ExternalData` finds, maps (once per file) and checks the external data of tensor protos;
  `read_external` is its one-tensor form, for code that holds a proto rather than a Graph.
"""

from __future__ import annotations

import functools
import mmap
import os
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import onnx

from edgeq.errors import ExternalDataError
from edgeq.ir.tensor import FileRegion, Tensor, elem_type_name, storage_nbytes

# ---- atomic writes --------------------------------------------------------------------


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """An unbuffered binary file that becomes `path` when the block ends without an error
    (and leaves nothing behind when it raises)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb", buffering=0) as handle:
            yield handle
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    data = memoryview(text.encode())
    with atomic_write(path) as handle:
        while data:
            data = data[handle.write(data):]


@functools.cache
def _umask() -> int:
    """The process umask (mkstemp creates 0600 files; written files get the usual mode)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (and put it back at once)
    os.umask(mask)
    return mask


# ---- memory maps ----------------------------------------------------------------------

# Every live memory map of model or external-data files, so that release_file_pages() can drop
# their resident pages: weights a pass has read (and replaced) would otherwise stay in RSS.
_LIVE_MAPS: list[weakref.ref] = []


def map_file(file: BinaryIO) -> np.ndarray:
    """The whole open `file` as a read-only uint8 array backed by a memory map."""
    array = np.frombuffer(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
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


# ---- external data --------------------------------------------------------------------


class ExternalData:
    """The external data files of one model (in `base_dir`), each memory-mapped once, read-only,
    with one open file descriptor per file however many tensors point into it."""

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
                self._maps[key] = (map_file(f), f)
        return self._maps[key]

    def inline(self, proto: onnx.TensorProto) -> None:
        """Make an external tensor proto (e.g. a Constant node's value) carry its bytes inline."""
        data = self.bytes_of(proto)
        proto.ClearField("external_data")
        proto.data_location = onnx.TensorProto.DEFAULT
        proto.raw_data = data.tobytes()


def read_external(tensor: onnx.TensorProto, base_dir: Path | None) -> np.ndarray:
    """The values of an external-data `tensor` whose model lives in `base_dir`, read-only: a view
    of the memory-mapped data file (a copy only for packed sub-byte types, or bytes not aligned
    for their dtype). Raises `ExternalDataError` for a missing, misplaced or short data file."""
    raw = ExternalData(base_dir).bytes_of(tensor)
    array = Tensor(tensor.data_type, tuple(tensor.dims), raw=raw).numpy()
    if not array.flags.aligned:
        array = array.copy()  # ONNX Runtime wants aligned data
    array.flags.writeable = False
    return array
