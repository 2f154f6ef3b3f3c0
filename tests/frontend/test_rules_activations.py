"""GELU variants -> `Gelu`, SiLU/SwiGLU operand orders: the op kinds after the pass, and ONNX
Runtime outputs unchanged; a GELU-shaped formula that computes something else is refused."""

from __future__ import annotations

import math

import pytest

from tests.frontend.graphs import MS, assert_same_outputs, canonicalize, const, kinds, model, node, rng_array, vi

D = 16
X = rng_array(2, 3, D, seed=1, scale=2.5)


def _erf(grouping: str, half: float = 0.5, opset: int = 21):
    """x * 0.5 * (1 + Erf(x / sqrt 2)) with its products grouped as exporters write them."""
    nodes = [node("Div", ["x", "sqrt2"], ["t"]) if grouping != "mul-inv" else node("Mul", ["x", "inv_sqrt2"], ["t"]),
             node("Erf", ["t"], ["e"]), node("Add", ["one", "e"], ["a"])]
    if grouping == "x-a-half":      # TorchScript: Mul(Mul(x, a), 0.5)
        nodes += [node("Mul", ["x", "a"], ["m"]), node("Mul", ["m", "half"], ["y"])]
    elif grouping == "a-half-x":
        nodes += [node("Mul", ["a", "half"], ["m"]), node("Mul", ["x", "m"], ["y"])]
    else:                           # Mul(Mul(x, 0.5), a)
        nodes += [node("Mul", ["half", "x"], ["m"]), node("Mul", ["m", "a"], ["y"])]
    inits = [const("sqrt2", math.sqrt(2.0)), const("inv_sqrt2", 1 / math.sqrt(2.0)), const("one", 1.0),
             const("half", half)]
    return model(nodes, [vi("x", ["b", "s", D])], [vi("y", ["b", "s", D])], inits, opset=opset)


@pytest.mark.parametrize("grouping", ["x-a-half", "a-half-x", "half-x-a", "mul-inv"])
def test_erf_gelu_becomes_gelu(grouping):
    source = _erf(grouping)
    graph, stats = canonicalize(source)
    assert stats["gelu-formula"] == 1
    (op,) = graph.ops()
    assert op.kind == "Gelu" and op.attr("approximate") in ("none", b"none")
    assert_same_outputs(source, graph, {"x": X})


def test_a_gelu_shaped_formula_with_another_constant_is_refused():
    graph, stats = canonicalize(_erf("x-a-half", half=0.6))
    assert "Gelu" not in kinds(graph) and kinds(graph)["Erf"] == 1
    assert stats == {"gelu-formula refused: the block does not compute GELU (none) on probe values": 1}


def _tanh(cube: str):
    """0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))."""
    nodes = [node("Pow", ["x", "three"], ["x3"])] if cube == "pow" else [
        node("Mul", ["x", "x"], ["x2"]), node("Mul", ["x2", "x"], ["x3"])]
    nodes += [node("Mul", ["c", "x3"], ["cx3"]), node("Add", ["x", "cx3"], ["inner"]),
              node("Mul", ["inner", "k"], ["arg"]), node("Tanh", ["arg"], ["t"]), node("Add", ["t", "one"], ["a"]),
              node("Mul", ["half", "x"], ["hx"]), node("Mul", ["hx", "a"], ["y"])]
    inits = [const("three", 3.0), const("c", 0.044715), const("k", math.sqrt(2 / math.pi)), const("one", 1.0),
             const("half", 0.5)]
    return model(nodes, [vi("x", ["b", "s", D])], [vi("y", ["b", "s", D])], inits)


@pytest.mark.parametrize("cube", ["pow", "products"])
def test_tanh_gelu_becomes_gelu_tanh(cube):
    source = _tanh(cube)
    graph, stats = canonicalize(source)
    assert stats["gelu-formula"] == 1
    (op,) = graph.ops()
    assert op.kind == "Gelu" and op.attr("approximate") in ("tanh", b"tanh")
    assert_same_outputs(source, graph, {"x": X})


@pytest.mark.parametrize("op_type,bias,approximate", [("Gelu", False, "none"), ("FastGelu", False, "tanh"),
                                                       ("FastGelu", True, "tanh"), ("BiasGelu", True, "none")])
def test_microsoft_gelus_become_gelu(op_type, bias, approximate):
    source = model([node(op_type, ["x", "bias"] if bias else ["x"], ["y"], domain=MS)], [vi("x", ["b", "s", D])],
                   [vi("y", ["b", "s", D])], [const("bias", rng_array(D, seed=7))], ms=True)
    graph, stats = canonicalize(source)
    assert stats["gelu-com-microsoft"] == 1
    assert kinds(graph) == {"Gelu": 1, **({"Add": 1} if bias else {})}
    assert graph.ops_of_type("Gelu")[0].attr("approximate") in (approximate, approximate.encode())
    assert_same_outputs(source, graph, {"x": X})


def test_gelu_needs_opset_20():
    graph, stats = canonicalize(_erf("x-a-half", opset=17))
    assert "Gelu" not in kinds(graph)
    assert stats == {"gelu-formula refused: Gelu needs opset 20 (the graph has 17)": 1}


def test_silu_and_swiglu_take_the_canonical_operand_order():
    source = model([node("Sigmoid", ["gate"], ["s"]), node("Mul", ["s", "gate"], ["silu"]),
                    node("Mul", ["up", "silu"], ["y"])],
                   [vi("gate", ["b", D]), vi("up", ["b", D])], [vi("y", ["b", D])])
    graph, stats = canonicalize(source)
    assert stats == {"silu-order": 1, "swiglu-order": 1}
    silu = graph.producer(graph.value("silu"))
    assert [v.name for v in graph.inputs_of(silu)] == ["gate", "s"]
    assert [v.name for v in graph.inputs_of(graph.producer(graph.value("y")))] == ["silu", "up"]
    assert_same_outputs(source, graph, {"gate": X[0], "up": X[1]})
    _, again = canonicalize(graph)
    assert again == {}
