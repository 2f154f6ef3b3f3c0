"""edgeq.ir.files: atomic writes (with the usual permissions, for models and reports alike) and
the one external-data reader that loading and calibration share."""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edgeq
from edgeq.errors import ExternalDataError
from edgeq.ir import files
from edgeq.ir.files import atomic_write, read_external, write_text_atomic
from edgeq.report import Report
from tests.ir import synthetic


@pytest.fixture
def umask_022():
    """The process umask set to 022 (and the writer's cached copy of it forgotten)."""
    old = os.umask(0o022)
    files._umask.cache_clear()
    yield
    os.umask(old)
    files._umask.cache_clear()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_models_and_reports_get_the_same_usual_permissions(tmp_path: Path, umask_022):
    model, _ = synthetic.opset_model(13)
    saved = edgeq.save(edgeq.load(model), tmp_path / "m.onnx")
    report = Report(model="m.onnx", target="x86-vnni", scheme="W8A8", options={})
    report.write(tmp_path / "report.json")
    report.write(tmp_path / "report.md")
    assert _mode(saved) == 0o644
    assert _mode(tmp_path / "report.json") == 0o644
    assert _mode(tmp_path / "report.md") == 0o644
    assert (tmp_path / "report.md").read_text().startswith("# edgeq compile report: m.onnx -> x86-vnni")


def test_external_data_files_get_the_usual_permissions(tmp_path: Path, umask_022):
    model, _ = synthetic.opset_model(13)
    saved = edgeq.save(edgeq.load(model), tmp_path / "m.onnx", external_data=True, external_threshold=0)
    assert _mode(saved.with_name("m.onnx.data")) == 0o644


def test_atomic_write_leaves_the_old_file_when_the_block_fails(tmp_path: Path):
    path = tmp_path / "out.txt"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError), atomic_write(path) as handle:
        handle.write(b"half of the new")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temp file left behind


def test_write_text_atomic_creates_folders_and_replaces(tmp_path: Path):
    path = tmp_path / "a" / "b" / "report.json"
    write_text_atomic(path, "x" * 100_000)
    write_text_atomic(path, "é")
    assert path.read_text(encoding="utf-8") == "é"


# ---- read_external ----------------------------------------------------------------------------


def _external(tmp_path: Path, array: np.ndarray, *, offset: int = 0, location: str = "w.bin",
              length: int | None = None) -> onnx.TensorProto:
    """A tensor proto whose bytes lie at `offset` in `tmp_path/location`."""
    proto = numpy_helper.from_array(array, "w")
    data = proto.raw_data
    (tmp_path / "w.bin").write_bytes(b"\0" * offset + data)
    proto.ClearField("raw_data")
    proto.data_location = onnx.TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset), "length": str(len(data) if length is None else length)}
    for key, value in entries.items():
        proto.external_data.add(key=key, value=value)
    return proto


def _is_mapped(array: np.ndarray) -> bool:
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base.obj if isinstance(base, memoryview) else base, mmap.mmap)


def test_read_external_is_a_read_only_map_of_the_data_file(tmp_path: Path):
    weight = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    array = read_external(_external(tmp_path, weight, offset=4096), tmp_path)
    np.testing.assert_array_equal(array, weight)
    assert array.dtype == np.float32 and _is_mapped(array) and not array.flags.writeable


def test_read_external_copies_bytes_not_aligned_for_their_dtype(tmp_path: Path):
    weight = np.arange(6, dtype=np.float32)
    array = read_external(_external(tmp_path, weight, offset=2), tmp_path)
    np.testing.assert_array_equal(array, weight)
    assert array.flags.aligned and not _is_mapped(array) and not array.flags.writeable


def test_read_external_unpacks_int4(tmp_path: Path):
    import ml_dtypes

    weight = np.array([-8, -1, 0, 3, 7], dtype=ml_dtypes.int4)
    proto = _external(tmp_path, weight)
    assert (tmp_path / "w.bin").stat().st_size == 3  # two values a byte
    np.testing.assert_array_equal(read_external(proto, tmp_path).astype(np.int8), weight.astype(np.int8))


@pytest.mark.parametrize(("change", "message"), [
    ({"remove_file": True}, "external data file missing"),
    ({"truncate": 3}, "too short"),
    ({"location": "../w.bin"}, "outside the model's folder"),
    ({"length": 5}, "length 5"),
    ({"base_dir": None}, "given in memory"),
])
def test_read_external_refuses_what_loading_refuses(tmp_path: Path, change: dict, message: str):
    proto = _external(tmp_path, np.ones(4, np.float32), location=change.get("location", "w.bin"),
                      length=change.get("length"))
    if change.get("remove_file"):
        (tmp_path / "w.bin").unlink()
    if "truncate" in change:
        os.truncate(tmp_path / "w.bin", change["truncate"])
    base_dir = None if "base_dir" in change else tmp_path
    with pytest.raises(ExternalDataError, match=message) as err:
        read_external(proto, base_dir)
    assert "'w'" in str(err.value)  # names the tensor


def test_loading_and_read_external_see_the_same_bytes(tmp_path: Path):
    """The IR loader maps external data through the same reader (one map per file)."""
    model, _ = synthetic.opset_model(13)
    path = edgeq.save(edgeq.load(model), tmp_path / "m.onnx", external_data=True, external_threshold=0)
    graph = edgeq.load(path)
    skeleton = onnx.load(str(path), load_external_data=False)
    external = [t for t in skeleton.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external
    for proto in external:
        np.testing.assert_array_equal(read_external(proto, tmp_path), graph.value(proto.name).const.numpy())
