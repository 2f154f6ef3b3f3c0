"""Ranges of the fpga lowering: the dry run records what it needs, known statistics are reused,
rotated tensors get a float counterpart to calibrate, and missing data is a clear error."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import helper

import edgeq
from edgeq.backends.fpga.lowering.ranges import (CalibratedRanges, RangeRequests, calibrated_ranges, rotated_name,
                                                 second_moments, with_rotations)
from edgeq.errors import CalibrationError, OptionError
from edgeq.ir import Graph
from edgeq.options import CalibrationOptions
from edgeq.quant.hadamard import sylvester

from tests.passes.helpers import model, vi


@pytest.fixture
def graph(tmp_path) -> Graph:
    proto = model([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Relu", ["s"], ["t"])],
                  [vi("x", [1, 4, 8]), vi("s", [1, "n"])], [vi("y", [1, 4, 8]), vi("t", [1, "n"])])
    onnx.save(proto, tmp_path / "relu.onnx")
    return edgeq.load(tmp_path / "relu.onnx")


def test_the_dry_run_records_each_tensor_once_in_order(graph) -> None:
    requests = RangeRequests(graph)
    assert requests.act("y") == (-1.0, 1.0) and requests.bound("x") == 1.0 and requests.act("y") == (-1.0, 1.0)
    assert requests.channel("x").shape == (8,)
    assert requests.second_moment("x") is None and requests.second_moment("x") is None
    assert requests.names == ["y", "x"] and requests.linear_inputs == ["x"]
    with pytest.raises(OptionError, match="no static last dimension"):
        requests.channel("t")


def test_known_statistics_with_channel_ranges_need_no_calibration_run(graph) -> None:
    known = {"y": SimpleNamespace(channel_min=np.zeros(8)), "x": SimpleNamespace(channel_min=None)}
    ranges = calibrated_ranges(graph, ["y"], known, None, CalibrationOptions(), threads=1)
    assert isinstance(ranges, CalibratedRanges) and ranges.stats == {"y": known["y"]}
    # x's statistics lack per-channel min/max: they must be collected, and there is no data
    with pytest.raises(CalibrationError, match="1 tensors of the integer datapath need calibration data"):
        calibrated_ranges(graph, ["y", "x"], known, None, CalibrationOptions(), threads=1)
    with pytest.raises(CalibrationError, match="GPTQ weight rounding needs calibration data"):
        second_moments(graph, ["x"], None, threads=1)


def test_rotated_tensors_get_a_float_counterpart_to_calibrate(graph) -> None:
    assert with_rotations(graph, ["x", "y"]) is graph   # nothing rotated: the graph itself
    name = rotated_name("x", 4)
    extended = with_rotations(graph, [name, "y"])
    assert extended is not graph and graph.producer(graph.value("y")) is not None
    assert not any(v.name == name for v in graph.values())   # the original is untouched
    matmul = extended.producer(extended.value(name))
    x, matrix = extended.inputs_of(matmul)
    assert matmul.op_type == "MatMul" and x.name == "x"
    np.testing.assert_array_equal(extended.constant(matrix).numpy(), np.kron(np.eye(2), sylvester(4)))
