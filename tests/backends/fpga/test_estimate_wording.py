"""`edgeq estimate` speaks about the model it was given (issue 16): the overlay's assumptions say
which products this model has and how they map onto the array's lanes (no "W4A8 packing" label
on a W8A8 model), and a missing input shape names the CLI flag, not a Python function."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.backends.fpga import MatVecLayer, estimate, layers_from_onnx
from edgeq.backends.fpga.reference import fq_bert_layers
from edgeq.errors import EdgeqError


def _assumptions(layers) -> list[str]:
    return list(estimate(layers, "zcu102", template="overlay").assumptions)


def test_a_w8a8_model_is_described_as_w8a8_on_the_arrays_lanes():
    w8a8 = [dataclasses.replace(x, weight_bits=8) if isinstance(x, MatVecLayer) else x
            for x in fq_bert_layers(encoders=1, hidden=384, ffn=1536)]
    text = _assumptions(w8a8)
    assert not any("W4A8 packing" in a for a in text)
    (products,) = [a for a in text if a.startswith("this model's matmuls: ")]
    assert products == "this model's matmuls: 8 W8A8 (2 lane(s) per product)"  # 6 linears, QK^T, PV
    assert any(a.startswith("DSP packing: two 4x8-bit lane products per DSP slice") for a in text)


def test_a_w4a8_model_takes_one_lane_per_product():
    (products,) = [a for a in _assumptions(fq_bert_layers(encoders=1)) if a.startswith("this model's matmuls: ")]
    assert "W4A8 (1 lane(s) per product)" in products


def test_a_symbolic_shape_without_recorded_shapes_names_the_cli_flag():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.integers(-8, 8, (16, 8)).astype(np.int8), "w")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    xzero = numpy_helper.from_array(np.array(0, np.uint8), "xz")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
                              [w, scale, zero, xzero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    with pytest.raises(EdgeqError) as info:
        layers_from_onnx(model)
    assert "--input-shape NAME=D0,D1,..." in str(info.value) and "layers_from_onnx" not in str(info.value)
