"""Input shapes: --input-shape checked against the graph and completed through shared dim names;
a target with `static_shapes` fixes the first calibration sample's shapes (and says so) or asks
for --input-shape; every compile records the shapes an estimate assumes."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from onnx import helper

import edgeq
from edgeq.errors import OptionError
from edgeq.frontend.shapes import complete_shapes, fix_input_shapes, resolve_input_shapes
from edgeq.metadata import INPUT_SHAPES_KEY, recorded_input_shapes
from edgeq.options import CompileOptions
from edgeq.registry import get_target
from tests.passes.helpers import model, op_types, vi

node = helper.make_node


@pytest.fixture
def two_inputs():
    """ids [batch, seq] and mask [batch, seq], feat [batch, 4]: y = Reshape(feat, Shape(feat)) + ..."""
    return edgeq.load(model([node("Cast", ["ids"], ["idsf"], to=1), node("Add", ["idsf", "mask"], ["y"]),
                             node("Shape", ["feat"], ["s"]), node("Reshape", ["feat", "s"], ["z"])],
                            [vi("ids", ["batch", "seq"]), vi("mask", ["batch", "seq"]), vi("feat", ["batch", 4])],
                            [vi("y", ["batch", "seq"]), vi("z", ["batch", 4])]))


def test_given_shapes_are_completed_through_shared_dim_names(two_inputs):
    assert complete_shapes(two_inputs, {"ids": (2, 7)}) == {"ids": (2, 7), "mask": (2, 7), "feat": (2, 4)}
    assert complete_shapes(two_inputs, {"feat": (3, 4)}) == {"feat": (3, 4)}  # seq follows from nothing given


@pytest.mark.parametrize("given,words", [
    ({"idz": (1, 2)}, "names no input of the model: idz"),
    ({"ids": (1, 2, 3)}, "has 3 dims but input ids has rank 2"),
    ({"feat": (2, 5)}, "sets axis 1 to 5 but the model fixes it at 4"),
    ({"ids": (2, 7), "mask": (3, 7)}, "gives dim 'batch' size 3 for mask but 2 for ids"),
])
def test_bad_given_shapes_are_one_line_option_errors(two_inputs, given, words):
    with pytest.raises(OptionError) as err:
        complete_shapes(two_inputs, given)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_fixing_shapes_lets_the_folder_fold_the_shape_work(two_inputs):
    from edgeq.passes.constant_folding import ConstantFolding
    from edgeq.passes.dead_code_elimination import DeadCodeElimination

    assert fix_input_shapes(two_inputs, {"ids": (2, 7), "mask": (2, 7), "feat": (2, 4)}) == 3
    assert [v.shape for v in two_inputs.inputs] == [(2, 7), (2, 7), (2, 4)]
    ConstantFolding()(two_inputs)
    DeadCodeElimination()(two_inputs)
    assert "Shape" not in op_types(two_inputs)


def test_resolution_by_target_kind(two_inputs):
    sample = {"ids": (1, 5), "mask": (1, 5), "feat": (1, 4)}
    dynamic = resolve_input_shapes(two_inputs, {}, static=False, sample=sample, target_name="t")
    assert dynamic.fixed == {} and dynamic.recorded == sample and dynamic.note is None
    static = resolve_input_shapes(two_inputs, {}, static=True, sample=sample, target_name="t")
    assert static.fixed == sample and "first calibration sample" in static.note
    with pytest.raises(OptionError, match="--input-shape"):
        resolve_input_shapes(two_inputs, {}, static=True, sample={}, target_name="t")
    with pytest.raises(OptionError, match=r"leaves ids\[batch, seq\], mask"):  # a static target needs them all
        resolve_input_shapes(two_inputs, {"feat": (1, 4)}, static=True, sample={}, target_name="t")
    given = resolve_input_shapes(two_inputs, {"ids": (3, 2)}, static=False, sample=sample, target_name="t")
    assert given.fixed == given.recorded == {"ids": (3, 2), "mask": (3, 2), "feat": (3, 4)}


def test_a_static_shape_target_fixes_the_first_calibration_sample(mlp_onnx):
    static = replace(get_target("x86-vnni"), static_shapes=True)
    samples = [{"x": np.random.default_rng(i).standard_normal((3, 16)).astype(np.float32)} for i in range(6)]
    result = edgeq.compile(mlp_onnx, static, calibration=samples)
    assert [v.shape for v in result.graph.inputs] == [(3, 16)]
    assert any("first calibration sample" in note for note in result.report.notes)
    assert recorded_input_shapes(dict(result.graph.model.metadata_props)) == {"x": [3, 16]}
    with pytest.raises(OptionError) as err:  # weight-only: no calibration needed, but shapes are
        edgeq.compile(mlp_onnx, static, CompileOptions(activations="float"))
    assert "--input-shape" in str(err.value) and "x[batch, 16]" in str(err.value)
    given = edgeq.compile(mlp_onnx, static, CompileOptions(activations="float", input_shapes={"x": [2, 16]}))
    assert [v.shape for v in given.graph.inputs] == [(2, 16)]
    assert json.loads(dict(given.graph.model.metadata_props)[INPUT_SHAPES_KEY]) == {"x": [2, 16]}


def test_a_dynamic_target_keeps_the_axes_and_records_the_calibration_shapes(mlp_onnx):
    samples = [{"x": np.random.default_rng(i).standard_normal((5, 16)).astype(np.float32)} for i in range(6)]
    result = edgeq.compile(mlp_onnx, "x86-vnni", calibration=samples)
    assert [v.shape for v in result.graph.inputs] == [("batch", 16)]
    assert recorded_input_shapes(dict(result.graph.model.metadata_props)) == {"x": [5, 16]}
    assert recorded_input_shapes({"edgeq.fpga.input_shapes": '{"x": [1, 16]}'}) == {"x": [1, 16]}  # older models
