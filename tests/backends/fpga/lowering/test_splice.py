"""Splicing helpers of the fpga lowering: the opset raise refuses host ops whose meaning changes,
and the recorded input shapes are those of the first calibration sample."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import edgeq
from edgeq.backends.fpga.lowering.splice import raise_opset, sample_shapes
from edgeq.errors import OptionError

from tests.passes.helpers import model, vi


def _load(node, opset: int, tmp_path, out_shape):
    proto = model([node], [vi("x", [1, 4, 8])], [vi("y", out_shape)], opset=opset)
    onnx.save(proto, tmp_path / "m.onnx")
    return edgeq.load(tmp_path / "m.onnx")


def test_the_opset_is_raised_when_host_ops_mean_the_same(tmp_path) -> None:
    graph = _load(helper.make_node("Add", ["x", "x"], ["y"]), 17, tmp_path, [1, 4, 8])
    raise_opset(graph, set(graph.ops()))
    assert graph.model.opset_imports[""] == 21 and graph.model.ir_version >= 10


def test_a_host_op_that_changes_meaning_is_refused(tmp_path) -> None:
    # ReduceMean's axes moved from an attribute to an input in opset 18
    graph = _load(helper.make_node("ReduceMean", ["x"], ["y"], axes=[-1]), 17, tmp_path, [1, 4, 1])
    with pytest.raises(OptionError, match="changes meaning between opset 17 and 21"):
        raise_opset(graph, set(graph.ops()))
    assert graph.model.opset_imports[""] == 17


def test_sample_shapes_are_the_first_samples() -> None:
    data = [{"ids": np.zeros((1, 16), np.int64), "mask": np.ones((1, 16))}, {"ids": np.zeros((1, 9), np.int64)}]
    assert sample_shapes(data) == {"ids": [1, 16], "mask": [1, 16]}
    assert sample_shapes(None) == {} and sample_shapes([]) == {}
