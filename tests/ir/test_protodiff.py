"""The proto comparison helper finds what differs (so 'no difference' means something)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import numpy_helper

from tests.ir import synthetic
from tests.ir.protodiff import first_difference


def _mutated(mutate) -> str | None:
    model, _ = synthetic.feature_model()
    other = copy.deepcopy(model)
    mutate(other)
    return first_difference(model, other)


def test_equal_models_have_no_difference():
    model, _ = synthetic.feature_model()
    assert first_difference(model, copy.deepcopy(model)) is None


def test_each_kind_of_change_is_found_and_located():
    found = {
        "attribute": _mutated(lambda m: setattr(m.graph.node[1].attribute[0], "f", 0.25)),
        "node order": _mutated(lambda m: m.graph.node.insert(0, m.graph.node.pop(3))),
        "initializer byte": _mutated(lambda m: setattr(m.graph.initializer[2], "raw_data",
                                                       m.graph.initializer[2].raw_data[:-1] + b"\x01")),
        "opset": _mutated(lambda m: setattr(m.opset_import[0], "version", 20)),
        "metadata": _mutated(lambda m: setattr(m.metadata_props[0], "value", "someone else")),
        "value_info metadata": _mutated(lambda m: m.graph.value_info[0].metadata_props.pop()),
        "function": _mutated(lambda m: setattr(m.functions[0].node[0], "op_type", "Sub")),
        "typed data": _mutated(lambda m: m.graph.initializer[0].int32_data.__setitem__(0, 1)),
    }
    assert found["attribute"].startswith("graph.node[1](c_max).attribute[0](value_float).f:")
    assert found["node order"].startswith("graph.node[0]")
    assert found["initializer byte"].startswith("graph.initializer[2](h16raw).raw_data:")
    assert found["opset"] == "opset_import[0].version: 21 != 20"
    assert found["metadata"].startswith("metadata_props[0](author).value:")
    assert found["value_info metadata"].startswith("graph.value_info[0](y1).metadata_props: 1 != 0 entries")
    assert found["function"].startswith("functions[0](AddMul).node[0].op_type:")
    assert found["typed data"].startswith("graph.initializer[0](h16).int32_data[0]:")


def test_nan_equals_nan_and_presence_is_optional():
    a = numpy_helper.from_array(np.array([np.nan], np.float32), "t")
    b = onnx.TensorProto()
    b.CopyFrom(a)
    assert first_difference(a, b) is None
    attr_a = onnx.helper.make_attribute("f", float("nan"))
    attr_b = onnx.helper.make_attribute("f", float("nan"))
    assert first_difference(attr_a, attr_b) is None
    assert first_difference(onnx.helper.make_attribute("f", 0.0), onnx.helper.make_attribute("f", -0.0)) == "f: 0.0 != -0.0"
    entry_a, entry_b = onnx.OperatorSetIdProto(version=1), onnx.OperatorSetIdProto(domain="", version=1)
    assert first_difference(entry_a, entry_b) is None
    assert first_difference(entry_a, entry_b, presence=True) == "domain: set in second only ('' vs '')"
