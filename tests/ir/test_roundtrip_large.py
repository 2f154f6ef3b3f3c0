"""A model over 2 GB with external data: load -> save (external data chosen automatically) ->
ONNX Runtime gives bit-identical outputs.

The source is cheap to build: its 2.3 GB of weights are a sparse file (holes read as zeros)
with a few rows written, and the model only Gathers/Slices a few rows, so running it is cheap.
The big tensors are declared with onnx's external-data helper and the small ones written by
onnx.save_model(save_as_external_data=True). Every file is deleted afterwards.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper
from onnx.external_data_helper import set_external_data

import edgeq
from tests.ir.helpers import assert_bit_identical, run
from tests.ir.protodiff import first_difference

pytestmark = pytest.mark.large_file

ROWS, COLS = 280_000, 1024          # two float32 tables of 1.15 GB each: 2.29 GB in all
TABLE_BYTES = ROWS * COLS * 4
WRITTEN_ROWS = (0, 1, 4097, 137_000, ROWS - 2, ROWS - 1)
DATA_NAME = "big.onnx.data"


def _row(table: int, row: int) -> np.ndarray:
    return (np.arange(COLS, dtype=np.float32) * (table + 1) + row * 0.5).astype(np.float32)


def _build(folder: Path) -> Path:
    with open(folder / DATA_NAME, "wb") as f:
        f.truncate(2 * TABLE_BYTES)  # sparse: nothing is written but the rows below
        for table in (0, 1):
            for row in WRITTEN_ROWS:
                f.seek(table * TABLE_BYTES + row * COLS * 4)
                f.write(_row(table, row).tobytes())
    tables = []
    for table in (0, 1):
        proto = T()
        proto.name, proto.data_type = f"E{table}", T.FLOAT
        proto.dims.extend([ROWS, COLS])
        proto.raw_data = b""  # set_external_data wants a raw_data field to move out; the bytes are on disk
        set_external_data(proto, DATA_NAME, offset=table * TABLE_BYTES, length=TABLE_BYTES)
        proto.ClearField("raw_data")
        tables.append(proto)
    small = [numpy_helper.from_array(np.linspace(-1, 1, COLS, dtype=np.float32), "bias"),  # 4 KB: onnx moves it out
             numpy_helper.from_array(np.array([ROWS - 2], np.int64), "starts"),
             numpy_helper.from_array(np.array([ROWS], np.int64), "ends"),
             numpy_helper.from_array(np.array([0], np.int64), "axes")]
    nodes = [helper.make_node("Gather", ["E0", "idx"], ["rows"], name="gather", axis=0),
             helper.make_node("Add", ["rows", "bias"], ["picked"], name="add"),
             helper.make_node("Slice", ["E1", "starts", "ends", "axes"], ["tail"], name="slice")]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("idx", T.INT64, ["k"])],
                              [helper.make_tensor_value_info("picked", T.FLOAT, ["k", COLS]),
                               helper.make_tensor_value_info("tail", T.FLOAT, [2, COLS])], tables + small)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = folder / "big.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_NAME, size_threshold=1024)
    return path


def _without_external_entries(model: onnx.ModelProto) -> onnx.ModelProto:
    for tensor in model.graph.initializer:
        tensor.ClearField("external_data")
        tensor.ClearField("data_location")
    return model


def test_over_2gb_roundtrip_with_automatic_external_data(tmp_path: Path):
    if shutil.disk_usage(tmp_path).free < 6 * 2**30:
        pytest.skip("needs 6 GB of free disk space for a 2.3 GB model")
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    try:
        source = _build(src_dir)
        graph = edgeq.load(source)
        assert sum(v.const.nbytes for v in graph.initializers) > 2**31
        saved = edgeq.save(graph, out_dir / "big.onnx")  # external_data=None: chosen since > 2 GB
        assert saved.stat().st_size < 1 << 20 and (out_dir / DATA_NAME).stat().st_size >= 2 * TABLE_BYTES
        stored = onnx.load(str(saved), load_external_data=False)
        offsets = {t.name: int({e.key: e.value for e in t.external_data}["offset"])
                   for t in stored.graph.initializer if t.data_location == T.EXTERNAL}
        assert set(offsets) == {"E0", "E1", "bias"} and all(o % 4096 == 0 for o in offsets.values())
        assert first_difference(_without_external_entries(onnx.load(str(source), load_external_data=False)),
                                _without_external_entries(stored)) is None
        del graph

        idx = np.array(WRITTEN_ROWS + (5, 200_000), np.int64)  # written rows and zero rows
        expected = run(source, {"idx": idx})
        assert_bit_identical(expected, run(saved, {"idx": idx}), "over 2 GB")
        bias = np.linspace(-1, 1, COLS, dtype=np.float32)
        truth = [_row(0, r) + bias for r in WRITTEN_ROWS] + [bias, bias]
        assert np.array_equal(expected[0], np.stack(truth))
        assert np.array_equal(expected[1], np.stack([_row(1, ROWS - 2), _row(1, ROWS - 1)]))
    finally:
        shutil.rmtree(src_dir, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
