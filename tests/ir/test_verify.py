"""edgeq.ir.verify: sound graphs pass; each broken invariant is reported by name."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper

import edgeq
import edgeq.ir.verify as verify_module
from edgeq.errors import GraphError
from edgeq.ir import Graph, Tensor, Value
from edgeq.ir.verify import check_with_onnx, find_problems, verify
from tests.ir import synthetic

SOUND = {
    "opset11": lambda: synthetic.opset_model(11)[0],
    "opset21": lambda: synthetic.opset_model(21)[0],
    "features": lambda: synthetic.feature_model()[0],
    "control_flow": lambda: synthetic.control_flow_model()[0],
    "storage": lambda: synthetic.storage_model()[0],
    "sparse": lambda: synthetic.sparse_model()[0],
    "custom_domain": synthetic.custom_domain_model,
}


@pytest.mark.parametrize("name", sorted(SOUND))
def test_sound_models_verify(name: str):
    graph = edgeq.load(SOUND[name]())
    assert find_problems(graph) == []
    verify(graph)


@pytest.mark.slow
def test_real_models_verify_and_pass_onnx_checks(rapidocr_models, silero_models, nudenet_model):
    for path in [*rapidocr_models.values(), *silero_models.values(), nudenet_model]:
        graph = edgeq.load(path)
        verify(graph)
        check_with_onnx(graph)


def _broken(graph: Graph, *words: str) -> str:
    """verify(graph) raises a one-line GraphError containing every word."""
    with pytest.raises(GraphError) as info:
        verify(graph)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


def _mlp() -> Graph:
    return edgeq.load(synthetic.opset_model(17)[0])


def _op(graph: Graph, name: str):
    (op,) = [op for op in graph.ops() if op.name == name]
    return op


# ---- 3. one producer -----------------------------------------------------------------------


def test_two_producers():
    graph = _mlp()
    graph._g.add_edge(_op(graph, "relu"), graph.value("h0"), key=("out", 1))
    _broken(graph, "'h0'", "2 producers", "'mm'", "'relu'")


def test_op_writing_an_initializer_or_graph_input():
    graph = _mlp()
    graph._g.add_edge(_op(graph, "relu"), graph.value("W"), key=("out", 1))
    _broken(graph, "'W'", "initializer", "'relu' writes it")
    graph = _mlp()
    graph._g.add_edge(_op(graph, "relu"), graph.value("x"), key=("out", 1))
    _broken(graph, "'x'", "graph input")


# ---- 7. acyclic ------------------------------------------------------------------------------


def test_cycle():
    graph = _mlp()
    graph.set_input(_op(graph, "mm"), 0, graph.value("h"))  # mm reads relu's output
    message = _broken(graph, "cycle")
    assert "'mm'" in message and "'relu'" in message


# ---- 4. slots --------------------------------------------------------------------------------


def test_required_input_left_empty():
    graph = _mlp()
    graph.set_input(_op(graph, "add"), 1, None)
    _broken(graph, "'add'", "required input slot 1", "(B)", "empty")


def test_required_output_left_empty():
    graph = _mlp()
    op = _op(graph, "split")
    graph._g.remove_edge(op, graph.value("a"), key=("out", 0))
    graph._g.nodes[op]["n_out"] = 2
    message = _broken(graph, "'split'", "required output slot 0")
    assert "empty" in message


def test_omitted_optional_slots_are_fine():
    graph = edgeq.load(synthetic.feature_model()[0])
    clip = _op(graph, "clip_max_only")
    assert graph.inputs_of(clip)[1] is None  # Clip's min omitted
    assert graph.outputs_of(_op(graph, "ln"))[1] is None  # LayerNormalization's Mean omitted
    verify(graph)


def test_input_slot_past_the_count_and_duplicated_slot():
    graph = _mlp()
    graph._g.add_edge(graph.value("x"), _op(graph, "relu"), key=("in", 3))
    _broken(graph, "'relu'", "slot 3", "past its 1 input slots")
    graph = _mlp()
    graph._g.add_edge(graph.value("x"), _op(graph, "relu"), key=("in", 0))  # parallel edge, same slot
    graph._g.add_edge(graph.value("b"), _op(graph, "relu"), key=("in", 0))
    _broken(graph, "'relu'", "two values in input slot 0")


def test_too_many_and_too_few_inputs():
    graph = _mlp()
    graph.set_input(_op(graph, "relu"), 1, graph.value("x"))
    _broken(graph, "'relu'", "2 inputs", "at most 1")
    graph = _mlp()
    add = _op(graph, "add")
    graph.set_input(add, 1, None)
    graph._g.nodes[add]["n_in"] = 1
    _broken(graph, "'add'", "1 inputs", "at least 2")


# ---- 5. inputs defined, 6. outputs exist ----------------------------------------------------


def test_dangling_input():
    graph = _mlp()
    ghost = graph.add_value(Value("ghost"))
    graph.set_input(_op(graph, "add"), 1, ghost)
    _broken(graph, "'add'", "'ghost'", "dangling")


def test_graph_output_that_nothing_produces():
    graph = _mlp()
    graph.outputs.append(graph.add_value(Value("nothing")))
    _broken(graph, "graph output 'nothing'", "produced by nothing")


def test_graph_output_not_in_the_graph():
    graph = _mlp()
    graph.outputs.append(Value("stranger"))
    _broken(graph, "graph output 'stranger'", "not a value of the graph")


# ---- 1. registry, 2. edges -------------------------------------------------------------------


def test_value_renamed_behind_the_registry():
    graph = _mlp()
    graph.value("h0").name = "renamed"
    _broken(graph, "'renamed'", "not registered")


def test_malformed_edges():
    graph = _mlp()
    graph._g.add_edge(_op(graph, "mm"), _op(graph, "add"), key=("out", 0))
    _broken(graph, "malformed edge", "'mm' -> 'add'")
    graph = _mlp()
    graph._g.add_edge(graph.value("x"), _op(graph, "add"), key="sideways")
    _broken(graph, "malformed edge", "'sideways'")


def test_initializer_listed_twice_or_without_data():
    graph = _mlp()
    graph.initializers.append(graph.value("W"))
    _broken(graph, "initializer 'W'", "listed twice")
    graph = _mlp()
    graph.value("b").const = None
    _broken(graph, "initializer 'b'", "no constant data")


# ---- 9. weights ----------------------------------------------------------------------------


def test_illegal_initializer_dtype():
    graph = _mlp()
    graph.value("b").const = Tensor(999, (16,), array=np.zeros(16, np.float32))
    _broken(graph, "initializer 'b'", "illegal element type")
    graph = _mlp()
    graph.value("b").const = Tensor(T.UNDEFINED, (16,), array=np.zeros(16, np.float32))
    _broken(graph, "initializer 'b'", "illegal element type (UNDEFINED)")


def test_initializer_data_of_the_wrong_size_or_dtype():
    graph = _mlp()
    graph.value("b").const = Tensor(T.FLOAT, (16,), raw=np.zeros(60, np.uint8))
    _broken(graph, "initializer 'b'", "60 bytes", "needs 64")
    graph = _mlp()
    graph.value("b").const = Tensor(T.FLOAT, (16,), array=np.zeros(16, np.float64))
    _broken(graph, "initializer 'b'", "float64")
    graph = _mlp()
    graph.value("b").const = Tensor(T.FLOAT, (16,), proto=helper.make_tensor("b", T.FLOAT, [15], np.zeros(15)))
    _broken(graph, "initializer 'b'", "disagrees")
    short = helper.make_tensor("b", T.FLOAT, [16], np.zeros(16))
    del short.float_data[-1]
    graph.value("b").const = Tensor(T.FLOAT, (16,), proto=short)
    _broken(graph, "initializer 'b'", "15 values in float_data", "needs 16")


def test_illegal_declared_value_type():
    graph = _mlp()
    graph.value("h0").set_type(123, [2, 16])
    _broken(graph, "'h0'", "illegal element type 123")


def test_attribute_keyed_by_another_name():
    graph = _mlp()
    op = _op(graph, "softmax")
    op.attributes["dim"] = op.attributes.pop("axis")
    _broken(graph, "'softmax'", "'dim'")


# ---- 10. nested graphs, 8. captures ----------------------------------------------------------


def _control_flow() -> Graph:
    return edgeq.load(synthetic.control_flow_model()[0])


def test_violation_inside_a_nested_graph_names_its_path():
    graph = _control_flow()
    loop = graph.ops_of_type("Loop")[0]
    body = loop.subgraphs["body"]
    mul = next(op for op in body.ops() if op.op_type == "Mul" and body.outputs_of(op)[0].name == "k_half")
    body.set_input(mul, 1, None)
    _broken(graph, "op 'loop'.body", "required input slot 1")


def test_capture_of_a_name_the_enclosing_graph_no_longer_defines():
    """Renaming an outer value without its captures leaves the body reading a dead name."""
    graph = _control_flow()
    graph.rename_value(graph.value("offset"), "offset_renamed")
    _broken(graph, "'scan'", "not linked: ['offset']")
    assert any("op 'scan'.body" in p and "enclosing graph that does not define it" in p for p in find_problems(graph))


def test_capture_without_an_implicit_edge():
    graph = _control_flow()
    scan = graph.ops_of_type("Scan")[0]
    graph._g.remove_edge(graph.value("w"), scan, key=("implicit", "w"))
    _broken(graph, "'scan'", "implicit inputs", "not linked: ['w']")


def test_outer_value_in_the_top_level_graph():
    graph = _mlp()
    outer = graph.add_value(Value("from_nowhere", outer=True))
    graph.set_input(_op(graph, "add"), 1, outer)
    _broken(graph, "top-level graph", "'from_nowhere'")


def test_cycle_through_a_capture():
    graph = _control_flow()
    relu = graph.producer(graph.value("k"))
    graph.set_input(relu, 0, graph.value("acc_final"))  # k = Relu(Loop output); the Loop body reads k
    _broken(graph, "cycle")


def test_problems_are_all_listed():
    graph = _mlp()
    graph.set_input(_op(graph, "add"), 1, None)
    graph.outputs.append(Value("stranger"))
    problems = find_problems(graph)
    assert len(problems) == 2
    _broken(graph, "(and 1 more problem)")


# ---- check_with_onnx ------------------------------------------------------------------------


def test_check_with_onnx_passes_sound_models():
    for opset in (11, 13, 17, 21):
        check_with_onnx(edgeq.load(synthetic.opset_model(opset)[0]))
    check_with_onnx(edgeq.load(synthetic.feature_model()[0]))
    check_with_onnx(edgeq.load(synthetic.control_flow_model()[0]))


def test_check_with_onnx_reports_the_checker():
    graph = _mlp()
    graph.value("b").const = Tensor.from_array(np.zeros(16, np.int64))  # Add(float, int64)
    with pytest.raises(GraphError, match="onnx.checker rejects the model"):
        check_with_onnx(graph)


def test_check_with_onnx_reports_onnxruntime():
    node = helper.make_node("Mystery", ["x"], ["y"], domain="com.example")
    model = helper.make_model(
        helper.make_graph([node], "g", [helper.make_tensor_value_info("x", T.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [2])]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)], ir_version=8)
    graph = edgeq.load(model)
    verify(graph)
    check_with_onnx(graph, runtime=False)  # onnx's checker leaves custom domains alone
    with pytest.raises(GraphError, match="onnxruntime cannot load the model"):
        check_with_onnx(graph)


def test_check_with_onnx_through_a_file_for_large_models(monkeypatch):
    """Past IN_MEMORY_LIMIT the model goes through a temporary external-data file."""
    monkeypatch.setattr(verify_module, "IN_MEMORY_LIMIT", 0)
    saved = []
    real_save = verify_module.save
    monkeypatch.setattr(verify_module, "save", lambda *a, **k: saved.append(k) or real_save(*a, **k))
    check_with_onnx(_mlp())
    assert saved == [{"external_data": True}]
    graph = _mlp()
    graph.value("b").const = Tensor.from_array(np.zeros(16, np.int64))
    with pytest.raises(GraphError, match="onnx.checker rejects the model"):
        check_with_onnx(graph)
