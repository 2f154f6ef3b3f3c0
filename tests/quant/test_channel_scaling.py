"""Folding a per-channel factor into the producer of an activation (SmoothQuant's and AWQ's
fold) changes a constant only when it is private to the match: read by nothing else, and
neither a graph input (an initializer the caller may override) nor a graph output. Each
refusal case here would be folded by a guard that only counted readers."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import edgeq
from edgeq.ir import Graph
from edgeq.quant.channel_scaling import fold_channel_scale_into_producer, insert_channel_mul
from edgeq.quant.sharing import is_owned_by_match, is_private_constant
from tests.passes.helpers import model, run, vi

node = helper.make_node
WIDTH = 4
INV = np.array([0.5, 2.0, 0.25, 4.0], np.float32)   # 1/s per channel


def _constants() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"gamma": (1 + 0.1 * rng.standard_normal(WIDTH)).astype(np.float32),
            "beta": (0.1 * rng.standard_normal(WIDTH)).astype(np.float32),
            "w0": rng.standard_normal((WIDTH, WIDTH)).astype(np.float32),
            "bias0": rng.standard_normal(WIDTH).astype(np.float32),
            "w": rng.standard_normal((WIDTH, WIDTH)).astype(np.float32)}


def _layer_norm_block(*, extra_inputs=(), extra_outputs=()) -> Graph:
    """x -> LayerNormalization(gamma, beta) -> h -> MatMul(w) -> y."""
    nodes = [node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, epsilon=1e-5),
             node("MatMul", ["h", "w"], ["y"])]
    return _load(nodes, extra_inputs, extra_outputs)


def _rms_gain_block(*, extra_inputs=(), extra_outputs=()) -> Graph:
    """x -> Mul(gamma) -> h -> MatMul(w) -> y (the gain of a decomposed RMSNorm)."""
    nodes = [node("Mul", ["x", "gamma"], ["h"]), node("MatMul", ["h", "w"], ["y"])]
    return _load(nodes, extra_inputs, extra_outputs)


def _linear_block(*, extra_inputs=(), extra_outputs=()) -> Graph:
    """x -> MatMul(w0) -> m -> Add(bias0) -> h -> MatMul(w) -> y (a preceding linear)."""
    nodes = [node("MatMul", ["x", "w0"], ["m"]), node("Add", ["m", "bias0"], ["h"]), node("MatMul", ["h", "w"], ["y"])]
    return _load(nodes, extra_inputs, extra_outputs)


def _load(nodes, extra_inputs, extra_outputs) -> Graph:
    consts = _constants()
    used = {name for n in nodes for name in n.input}
    inits = {name: array for name, array in consts.items() if name in used}
    shapes = {name: list(array.shape) for name, array in inits.items()}
    shapes.update(m=[2, WIDTH], h=[2, WIDTH])
    inputs = [vi("x", [2, WIDTH])] + [vi(name, shapes[name]) for name in extra_inputs]
    outputs = [vi("y", [2, WIDTH])] + [vi(name, shapes[name]) for name in extra_outputs]
    return edgeq.load(model(nodes, inputs, outputs, inits))


def _fold(graph: Graph) -> bool:
    h = graph.value("h")
    return fold_channel_scale_into_producer(graph, h, graph.consumers(h), INV)


def _unchanged(graph: Graph, *names: str) -> bool:
    consts = _constants()
    return all(np.array_equal(graph.value(n).const.numpy(), consts[n]) for n in names)


# ---- the guard itself ----------------------------------------------------------------------


def test_a_constant_read_only_by_the_op_and_invisible_to_the_caller_is_private():
    graph = _layer_norm_block()
    (norm,) = graph.ops_of_type("LayerNormalization")
    (matmul,) = graph.ops_of_type("MatMul")
    assert is_private_constant(graph, graph.value("gamma"), norm)
    assert not is_private_constant(graph, graph.value("gamma"), matmul)   # not its reader
    assert not is_private_constant(graph, graph.value("x"), norm)         # not a constant
    assert not is_private_constant(graph, None, norm)


@pytest.mark.parametrize("where", ["input", "output"])
def test_a_constant_the_caller_sees_is_not_private(where):
    graph = _layer_norm_block(**{f"extra_{where}s": ["gamma"]})
    (norm,) = graph.ops_of_type("LayerNormalization")
    assert graph.value("gamma").const is not None and graph.consumers(graph.value("gamma")) == [norm]
    assert not is_private_constant(graph, graph.value("gamma"), norm)


def test_a_constant_read_by_two_ops_is_private_to_neither():
    nodes = [node("MatMul", ["x", "w"], ["a"]), node("MatMul", ["x", "w"], ["b"]), node("Add", ["a", "b"], ["y"])]
    graph = _load(nodes, (), ())
    first, second = graph.ops_of_type("MatMul")
    assert not is_private_constant(graph, graph.value("w"), first)
    assert not is_private_constant(graph, graph.value("w"), second)


def test_a_value_is_owned_by_a_match_holding_all_its_readers_unless_it_is_a_graph_output():
    graph = _linear_block()
    matmul, second = graph.ops_of_type("MatMul")
    (add,) = graph.ops_of_type("Add")
    m = graph.value("m")
    assert is_owned_by_match(graph, m, [add])
    assert is_owned_by_match(graph, m, [add, second])        # more ops in the match is fine
    assert not is_owned_by_match(graph, m, [second])          # its reader is outside the match
    assert not is_owned_by_match(graph, graph.value("y"), [])  # a graph output
    graph = _linear_block(extra_outputs=["m"])
    (add,) = graph.ops_of_type("Add")
    assert not is_owned_by_match(graph, graph.value("m"), [add])


# ---- the fold ------------------------------------------------------------------------------


def _sample() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((2, WIDTH)).astype(np.float32)}


@pytest.mark.parametrize("block", [_layer_norm_block, _rms_gain_block, _linear_block])
def test_a_private_producer_takes_the_factor_so_its_output_is_scaled_by_it(block):
    h_before = run(block(extra_outputs=["h"]), _sample(), optimize=False)[1]
    graph = block()
    assert _fold(graph)
    graph.outputs.append(graph.value("h"))
    h_after = run(graph, _sample(), optimize=False)[1]
    assert np.allclose(h_after, h_before * INV, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", ["input", "output"])
@pytest.mark.parametrize("name", ["gamma", "beta"])
def test_layer_norm_constants_the_caller_sees_are_not_scaled(where, name):
    graph = _layer_norm_block(**{f"extra_{where}s": [name]})
    assert not _fold(graph)
    assert _unchanged(graph, "gamma", "beta")


@pytest.mark.parametrize("where", ["input", "output"])
def test_an_rms_gain_the_caller_sees_is_not_scaled(where):
    graph = _rms_gain_block(**{f"extra_{where}s": ["gamma"]})
    assert not _fold(graph)
    assert _unchanged(graph, "gamma")


@pytest.mark.parametrize("where", ["input", "output"])
@pytest.mark.parametrize("name", ["w0", "bias0"])
def test_a_preceding_linear_whose_constants_the_caller_sees_is_not_scaled(where, name):
    graph = _linear_block(**{f"extra_{where}s": [name]})
    assert not _fold(graph)
    assert _unchanged(graph, "w0", "bias0")


def test_a_preceding_linear_whose_product_is_a_graph_output_is_not_scaled():
    graph = _linear_block(extra_outputs=["m"])   # m = x W0 is seen by the caller
    assert not _fold(graph)
    assert _unchanged(graph, "w0", "bias0")


def test_an_activation_with_a_reader_outside_the_match_is_not_folded():
    graph = _layer_norm_block(extra_outputs=["h"])
    assert not _fold(graph)
    assert _unchanged(graph, "gamma", "beta")
    graph = _load([node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, epsilon=1e-5),
                   node("MatMul", ["h", "w"], ["a"]), node("Relu", ["h"], ["r"]), node("Add", ["a", "r"], ["y"])],
                  (), ())
    (matmul,) = graph.ops_of_type("MatMul")
    assert not fold_channel_scale_into_producer(graph, graph.value("h"), [matmul], INV)
    assert _unchanged(graph, "gamma", "beta")


def test_an_explicit_mul_scales_the_activation_for_the_given_readers_only():
    graph = _layer_norm_block()
    before = run(graph, _sample(), optimize=False)[0]
    h = graph.value("h")
    insert_channel_mul(graph, h, graph.consumers(h), INV)
    w = graph.value("w")
    graph.set_const(w, w.const.numpy() / INV[:, None])   # W' = diag(s) W undoes it exactly
    assert _unchanged(graph, "gamma", "beta")
    assert [op.op_type for op in graph.consumers(h)] == ["Mul"]
    assert np.allclose(run(graph, _sample(), optimize=False)[0], before, rtol=1e-5, atol=1e-5)
