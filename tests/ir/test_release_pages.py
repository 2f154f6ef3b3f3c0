"""Dropping resident pages of mapped weight files keeps every weight's value; the skeleton
reader leaves weights' bytes on disk."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

import edgeq
from edgeq.ir import files
from edgeq.ir.loader import read_skeleton


def _model(path):
    weight = np.arange(1 << 16, dtype=np.float32).reshape(256, 256)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 256])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 256])],
                              [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return weight


def test_released_pages_read_back_the_same_values(tmp_path):
    weight = _model(tmp_path / "m.onnx")
    graph = edgeq.load(tmp_path / "m.onnx")
    mapped = [ref() for ref in files._LIVE_MAPS if ref() is not None]
    assert mapped, "the loaded file is registered as a live map"
    before = graph.constant(graph.value("w")).numpy().copy()
    files.release_file_pages()
    after = graph.constant(graph.value("w")).numpy()
    np.testing.assert_array_equal(before, weight)
    np.testing.assert_array_equal(after, weight)


def test_skeleton_has_the_graph_but_not_the_weight_bytes(tmp_path):
    _model(tmp_path / "m.onnx")
    skeleton = read_skeleton(tmp_path / "m.onnx")
    (init,) = skeleton.graph.initializer
    assert (init.name, list(init.dims)) == ("w", [256, 256])
    assert not init.raw_data and [i.name for i in skeleton.graph.input] == ["x"]
