"""Rule dispatch of the fpga lowering: a role the front end found wins over the op kind, an op in
another domain has no rule, and a new rule is one table entry."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper

import edgeq
from edgeq.backends.fpga.lowering import rules
from edgeq.backends.fpga.lowering.driver import lower_datapath
from edgeq.backends.fpga.lowering.options import LoweringOptions
from edgeq.backends.fpga.lowering.ranges import RangeRequests
from edgeq.backends.fpga.lowering.state import Lowering
from edgeq.errors import OptionError
from edgeq.ir import Graph, Op
from edgeq.targets.base import Granularity, QSpec

from tests.passes.helpers import model, vi

NORM_INITS = {"g": np.ones(8, np.float32), "b": np.zeros(8, np.float32)}
NORM = helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1)


def options() -> LoweringOptions:
    act = QSpec("int8", symmetric=True, scale_pow2=True)
    weight = QSpec("int8", symmetric=True, scale_pow2=True, granularity=Granularity.CHANNEL, axis=1)
    return LoweringOptions(act, weight, first_norm="integer", equalization=None, max_channel_shift=8,
                           probability_bits=16, residual_bits=16, rotate=True, scale_choice="cover")


def load(proto: onnx.ModelProto, tmp_path) -> Graph:
    path = tmp_path / "model.onnx"
    onnx.save(proto, path)
    return edgeq.load(path)


def test_a_gelu_found_by_pattern_is_one_rule_not_its_ops(tmp_path) -> None:
    """The Div/Erf/Add/Mul of GELU's Erf formula have the GELU role: the GELU rule lowers them
    together (by kind alone, Div and Mul would be rescales and Erf would have no rule)."""
    nodes = [NORM,
             helper.make_node("Div", ["n", "sqrt2"], ["d"]),
             helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]),
             helper.make_node("Mul", ["n", "a"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["y"])]
    inits = {**NORM_INITS, "sqrt2": np.array(math.sqrt(2.0), np.float32), "one": np.array(1.0, np.float32),
             "half": np.array(0.5, np.float32)}
    graph = load(model(nodes, [vi("x", [1, 4, 8])], [vi("y", [1, 4, 8])], inits), tmp_path)
    lowering = lower_datapath(graph, options(), RangeRequests(graph))
    assert sorted(op.op_type for op in lowering.lowered) == ["Add", "Div", "Erf", "LayerNormalization", "Mul", "Mul"]
    kinds = [step.kind for step in lowering.program.steps]
    assert kinds.count("GeluInt") == 1 and kinds.count("LayerNormInt") == 1


def test_an_op_of_another_domain_has_no_rule(tmp_path) -> None:
    nodes = [NORM, helper.make_node("Gelu", ["n"], ["y"], domain="com.microsoft")]
    proto = helper.make_model(
        helper.make_graph(nodes, "test", [vi("x", [1, 4, 8])], [vi("y", [1, 4, 8])],
                          [onnx.numpy_helper.from_array(a, n) for n, a in NORM_INITS.items()]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=8)
    graph = load(proto, tmp_path)
    with pytest.raises(OptionError, match="no integer rule for com.microsoft"):
        lower_datapath(graph, options(), RangeRequests(graph))


def test_a_new_rule_is_one_table_entry(tmp_path, monkeypatch) -> None:
    nodes = [NORM, helper.make_node("Relu", ["n"], ["y"])]
    graph = load(model(nodes, [vi("x", [1, 4, 8])], [vi("y", [1, 4, 8])], NORM_INITS), tmp_path)
    with pytest.raises(OptionError, match="no integer rule for Relu"):
        lower_datapath(graph, options(), RangeRequests(graph))
    seen = []

    def passthrough(lowering: Lowering, op: Op) -> None:   # a stand-in rule: y has x's integers
        seen.append(op.op_type)
        x = lowering.int8(lowering.graph.inputs_of(op)[0].name)
        lowering.forms[lowering.graph.outputs_of(op)[0].name] = x

    monkeypatch.setitem(rules.RULES_BY_KIND, "Relu", passthrough)
    lowering = lower_datapath(graph, options(), RangeRequests(graph))
    assert seen == ["Relu"]
    assert [op.op_type for op in lowering.lowered] == ["LayerNormalization", "Relu"]
    assert [graph_name for _, graph_name in lowering.program.outputs] == ["y"]
