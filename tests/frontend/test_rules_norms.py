"""LayerNorm and RMSNorm variants -> their canonical forms: the op kinds after the pass, and ONNX
Runtime outputs unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from tests.passes.helpers import assert_valid, run
from tests.frontend.graphs import (MS, F, I64, assert_same_outputs, canonicalize, const, kinds, model, node,
                                   rng_array, vi)

D = 8
X = rng_array(2, 3, D, seed=1, scale=3.0) + 1.5
GAMMA = rng_array(D, seed=2) + 1.0
BETA = rng_array(D, seed=3)
EPS = 1e-5
AXES = const("axes", [-1], np.int64)


def _layer_norm_decomposed(variant: str):
    """x - mean, its variance and the normalization, in the orders exporters write."""
    nodes = [node("ReduceMean", ["x", "axes"], ["mean"]), node("Sub", ["x", "mean"], ["d"])]
    nodes.append(node("Pow", ["d", "two"], ["sq"]) if variant != "mul-square" else node("Mul", ["d", "d"], ["sq"]))
    nodes += [node("ReduceMean", ["sq", "axes"], ["var"]), node("Add", ["eps", "var"], ["ve"])]
    if variant == "pow-half":
        nodes += [node("Pow", ["ve", "minus_half"], ["inv"]), node("Mul", ["inv", "d"], ["n"])]
    elif variant == "reciprocal":
        nodes += [node("Sqrt", ["ve"], ["std"]), node("Reciprocal", ["std"], ["inv"]), node("Mul", ["d", "inv"], ["n"])]
    else:
        nodes += [node("Sqrt", ["ve"], ["std"]), node("Div", ["d", "std"], ["n"])]
    nodes += [node("Mul", ["gamma", "n"], ["scaled"]), node("Add", ["scaled", "beta"], ["y"])]
    inits = [AXES, const("two", 2.0), const("eps", EPS), const("minus_half", -0.5), const("gamma", GAMMA),
             const("beta", BETA.reshape(1, 1, D))]
    return model(nodes, [vi("x", ["b", "s", D])], [vi("y", ["b", "s", D])], inits)


@pytest.mark.parametrize("variant", ["div", "mul-square", "pow-half", "reciprocal"])
def test_decomposed_layer_norm_becomes_layer_normalization(variant):
    source = _layer_norm_decomposed(variant)
    graph, stats = canonicalize(source)
    assert stats["layer-norm-decomposed"] == 1
    assert kinds(graph) == {"LayerNormalization": 1}
    (op,) = graph.ops()
    assert op.attr("axis") == -1 and op.attr("epsilon") == pytest.approx(EPS)
    assert graph.outputs[0].name == "y"
    assert_same_outputs(source, graph, {"x": X})


def test_a_norm_over_another_axis_is_refused():
    source = _layer_norm_decomposed("div")
    for init in source.graph.initializer:
        if init.name == "axes":
            init.CopyFrom(const("axes", [1], np.int64))
    graph, stats = canonicalize(source)
    assert "LayerNormalization" not in kinds(graph)
    assert not any(k.startswith("layer-norm-decomposed") and "refused" not in k for k in stats)


def _skip(bias: bool, linear: bool, sum_output: bool):
    inputs = [vi("h" if linear else "x", ["b", "s", D]), vi("skip", ["b", "s", D])]
    nodes = [node("MatMul", ["h", "w"], ["x"])] if linear else []
    names = ["x", "skip", "gamma", "beta"] + (["bias"] if bias else [])
    outs = ["y", "", "", "sum"] if sum_output else ["y"]
    nodes.append(node("SkipLayerNormalization", names, outs, domain=MS, epsilon=1e-12))
    outputs = [vi("y", ["b", "s", D])] + ([vi("sum", ["b", "s", D])] if sum_output else [])
    inits = [const("gamma", GAMMA), const("beta", BETA), const("bias", rng_array(D, seed=4)),
             const("w", rng_array(D, D, seed=5))]
    return model(nodes, inputs, outputs, inits, ms=True)


@pytest.mark.parametrize("bias,linear,sum_output", [(False, False, False), (True, False, True), (True, True, False)])
def test_skip_layer_norm_becomes_add_then_layer_normalization(bias, linear, sum_output):
    source = _skip(bias, linear, sum_output)
    graph, stats = canonicalize(source)
    assert stats["layer-norm-skip"] == 1
    assert kinds(graph) == {"LayerNormalization": 1, "Add": 1 + bias, **({"MatMul": 1} if linear else {})}
    if bias and linear:  # the bias goes back onto its linear layer, then the residual add
        matmul = graph.ops_of_type("MatMul")[0]
        first_add = graph.consumers(graph.outputs_of(matmul)[0])[0]
        assert first_add.op_type == "Add" and graph.is_const(graph.inputs_of(first_add)[1])
    feeds = {"skip": X * 0.5, ("h" if linear else "x"): X}
    assert_same_outputs(source, graph, feeds)


def test_microsoft_layer_norm_becomes_the_onnx_op():
    """(ONNX Runtime's CPU provider registers no com.microsoft LayerNormalization to compare with:
    the reference is the formula.)"""
    source = model([node("LayerNormalization", ["x", "gamma", "beta"], ["y"], domain=MS, axis=-1, epsilon=1e-6)],
                   [vi("x", ["b", "s", D])], [vi("y", ["b", "s", D])], [const("gamma", GAMMA), const("beta", BETA)],
                   ms=True)
    graph, stats = canonicalize(source)
    assert stats["layer-norm-com-microsoft"] == 1
    (op,) = graph.ops()
    assert op.kind == "LayerNormalization" and op.attr("epsilon") == pytest.approx(1e-6)
    assert_valid(graph)
    centred = X - X.mean(-1, keepdims=True)
    want = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-6) * GAMMA + BETA
    np.testing.assert_allclose(run(graph, {"x": X})[0], want, rtol=1e-4, atol=1e-5)


# ---- RMSNorm ----------------------------------------------------------------------------------

def _rms(variant: str):
    sq = node("Mul", ["x", "x"], ["sq"]) if variant == "mul-square" else node("Pow", ["x", "two"], ["sq"])
    nodes = [sq, node("ReduceMean", ["sq", "axes"], ["ms"]), node("Add", ["eps", "ms"], ["ve"])]
    if variant == "div":
        nodes += [node("Sqrt", ["ve"], ["std"]), node("Div", ["x", "std"], ["n"])]
    elif variant == "pow-half":
        nodes += [node("Pow", ["ve", "minus_half"], ["inv"]), node("Mul", ["x", "inv"], ["n"])]
    elif variant == "one-over":  # the TorchScript exporter's 1 / sqrt
        nodes += [node("Sqrt", ["ve"], ["std"]), node("Div", ["one", "std"], ["inv"]), node("Mul", ["x", "inv"], ["n"])]
    else:
        nodes += [node("Sqrt", ["ve"], ["std"]), node("Reciprocal", ["std"], ["inv"]), node("Mul", ["inv", "x"], ["n"])]
    nodes.append(node("Mul", ["n", "gamma"], ["y"]))
    inits = [AXES, const("two", 2.0), const("eps", EPS), const("minus_half", -0.5), const("one", 1.0),
             const("gamma", GAMMA)]
    return model(nodes, [vi("x", ["b", "s", D])], [vi("y", ["b", "s", D])], inits)


CANONICAL_RMS = ["Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul", "Mul"]


def _assert_canonical_rms(graph, x_name: str = "x") -> None:
    assert sorted(op.op_type for op in graph.ops() if op.op_type != "Add" or graph.is_const(
        graph.inputs_of(op)[1])) == sorted(CANONICAL_RMS)
    last = graph.producer(graph.outputs[0])
    assert last.op_type == "Mul" and graph.is_const(graph.inputs_of(last)[0])  # Mul(gamma, normalized)
    normed = graph.producer(graph.inputs_of(last)[1])
    assert normed.op_type == "Mul" and graph.inputs_of(normed)[0].name == x_name
    assert graph.producer(graph.inputs_of(normed)[1]).op_type == "Reciprocal"


@pytest.mark.parametrize("variant", ["div", "pow-half", "one-over", "mul-square", "reciprocal-swapped"])
def test_rms_norm_variants_become_the_builder_form(variant):
    source = _rms(variant)
    graph, stats = canonicalize(source)
    assert stats["rms-norm-decomposed"] == 1
    _assert_canonical_rms(graph)
    assert_same_outputs(source, graph, {"x": X})


def test_the_canonical_rms_norm_is_left_alone():
    graph, _ = canonicalize(_rms("reciprocal-swapped"))
    _, stats = canonicalize(graph)
    assert "rms-norm-decomposed" not in stats


@pytest.mark.parametrize("op_type,domain,opset", [("SimplifiedLayerNormalization", "", 21),  # ORT's domain for it
                                                  ("RMSNormalization", "", 23)])
def test_fused_rms_norms_become_the_builder_form(op_type, domain, opset):
    source = model([node(op_type, ["x", "gamma"], ["y"], domain=domain or None, axis=-1, epsilon=EPS)],
                   [vi("x", ["b", "s", D])], [vi("y", ["b", "s", D])], [const("gamma", GAMMA)], opset=opset,
                   ms=bool(domain))
    graph, stats = canonicalize(source)
    assert stats["rms-norm-fused"] == 1
    _assert_canonical_rms(graph)
    assert_same_outputs(source, graph, {"x": X})


def test_skip_simplified_layer_norm_becomes_add_then_rms_norm():
    source = model([node("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma"], ["y", "", "", "sum"],
                         domain=MS, epsilon=EPS)],
                   [vi("x", ["b", "s", D]), vi("skip", ["b", "s", D])],
                   [vi("y", ["b", "s", D]), vi("sum", ["b", "s", D])],
                   [const("gamma", GAMMA)], ms=True)
    graph, stats = canonicalize(source)
    assert stats["rms-norm-skip"] == 1
    assert kinds(graph) == {"Add": 2, "Pow": 1, "ReduceMean": 1, "Sqrt": 1, "Reciprocal": 1, "Mul": 2}
    assert graph.producer(graph.value("sum")).op_type == "Add"
    assert_same_outputs(source, graph, {"x": X, "skip": X[::-1].copy()})


def test_an_unused_int_input_does_not_matter():
    """The graph interface is untouched: inputs and outputs keep their names and order."""
    source = _rms("div")
    source.graph.input.append(vi("unused", ["b"], I64))
    graph, _ = canonicalize(source)
    assert [v.name for v in graph.inputs] == ["x", "unused"] and [v.name for v in graph.outputs] == ["y"]
    assert graph.value("x").elem_type == F
