"""The protobuf wire scanner: a model file splits into a skeleton protobuf parses and the exact
places of its initializers' raw_data; broken bytes raise WireError (truncated or not)."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest

from edgeq.ir.wire import FileReader, WireError, fields, looks_like_onnx, split_raw_data
from tests.ir import synthetic


def _reader(path: Path) -> tuple[FileReader, int]:
    fd = os.open(path, os.O_RDONLY)
    return FileReader(fd, os.fstat(fd).st_size), fd


def test_skeleton_and_raw_data_ranges(tmp_path: Path):
    """feature_model has raw_data tensors and typed-field ones (float16 in int32_data, strings)."""
    model, _ = synthetic.feature_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    reader, fd = _reader(path)
    try:
        skeleton, ranges = split_raw_data(reader, reader.size)
        assert looks_like_onnx(reader)
    finally:
        os.close(fd)
    parsed = onnx.ModelProto()
    parsed.ParseFromString(skeleton)
    data = path.read_bytes()
    assert len(ranges) == len(model.graph.initializer) == len(parsed.graph.initializer)
    for original, stripped, where in zip(model.graph.initializer, parsed.graph.initializer, ranges):
        assert (stripped.name, list(stripped.dims)) == (original.name, list(original.dims))
        assert not stripped.raw_data
        if original.raw_data:
            offset, length = where
            assert data[offset:offset + length] == original.raw_data
        else:
            assert where is None  # typed-field tensors keep their data in the skeleton
            assert stripped == original
    parsed.graph.ClearField("initializer")
    model.graph.ClearField("initializer")
    assert parsed == model  # nothing else was touched


def test_cut_bytes_are_truncated_and_garbage_is_not(tmp_path: Path):
    model, _ = synthetic.opset_model(13)
    data = model.SerializeToString()
    with pytest.raises(WireError) as cut:
        list(fields(data[:len(data) - 3], 0, len(data) - 3))
    assert cut.value.truncated
    garbage = bytes([0x0F, 0x01])  # field 1, wire type 7: no such wire type
    with pytest.raises(WireError, match="wire type 7") as bad:
        list(fields(garbage, 0, len(garbage)))
    assert not bad.value.truncated
