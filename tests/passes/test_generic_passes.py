"""The generic passes leave a valid graph (IR invariants, onnx checker, ORT load) and the same
ONNX Runtime outputs, on the synthetic transformers and on small graphs built for each case."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edgeq
from edgeq.ir import Graph
from edgeq.pipeline import PassContext, PassManager, VerifyInstrument, leaf_records
from edgeq.passes.constant_folding import ConstantFolding
from edgeq.passes.dead_code_elimination import DeadCodeElimination
from edgeq.passes.identity_elimination import IdentityElimination
from edgeq.passes.shape_inference import ShapeInference
from edgeq.passes.topological_sort import TopologicalSort
from edgeq.registry import get_pass
from tests.passes.helpers import GENERIC, assert_valid, model, op_types, run, vi

I64 = TensorProto.INT64
node = helper.make_node


def _outputs_unchanged(before: onnx.ModelProto, graph: Graph, feeds: dict, *, exact: bool = True) -> None:
    expected, actual = run(before, feeds, optimize=False), run(graph, feeds, optimize=False)
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.shape == a.shape and e.dtype == a.dtype
        if exact:
            assert np.array_equal(e, a)
        else:
            np.testing.assert_allclose(a, e, rtol=2e-5, atol=1e-4)  # float32 sums of 256 terms


def _checked(passes, graph: Graph):
    """Run passes with the IR/onnx/ORT check after each one; the first pass's record."""
    ctx = PassContext(instruments=[VerifyInstrument(with_onnxruntime=True)])
    PassManager(list(passes))(graph, ctx)
    assert_valid(graph)
    return ctx.records[0], ctx


# ---- every generic pass on the synthetic transformers ------------------------------------


@pytest.mark.parametrize("pass_name", GENERIC)
@pytest.mark.parametrize("which", ["bert", "llama"])
def test_generic_pass_keeps_synthetic_model_valid_and_outputs_identical(which, pass_name, synthetic_bert,
                                                                       synthetic_llama, bert_feeds, llama_feeds):
    path, feeds = (synthetic_bert, bert_feeds[0]) if which == "bert" else (synthetic_llama, llama_feeds[0])
    before = onnx.load(str(path))
    graph = edgeq.load(path)
    names_in = [v.name for v in graph.inputs]
    names_out = [v.name for v in graph.outputs]
    _checked([get_pass(pass_name)()], graph)
    assert [v.name for v in graph.inputs] == names_in and [v.name for v in graph.outputs] == names_out
    _outputs_unchanged(before, graph, feeds)


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_generic_pipeline_reaches_a_fixed_point(which, synthetic_bert, synthetic_llama, bert_feeds, llama_feeds):
    path, feeds = (synthetic_bert, bert_feeds[1]) if which == "bert" else (synthetic_llama, llama_feeds[1])
    graph = edgeq.load(path)
    pipeline = PassManager([get_pass(n)() for n in GENERIC], until_fixed_point=True, max_iterations=5)
    ctx = PassContext(instruments=[VerifyInstrument()])
    pipeline(graph, ctx)
    records = leaf_records(ctx.records)
    assert len(records) < 5 * len(GENERIC), "the generic passes never stop reporting changes"
    assert all(not r.modified for r in records[-len(GENERIC):])
    assert_valid(graph)
    _outputs_unchanged(onnx.load(str(path)), graph, feeds)


# ---- constant folding ----------------------------------------------------------------------


def _reshape_chain(batch: int | str = 2) -> onnx.ModelProto:
    """y = Reshape(Relu(x), [Shape(Relu(x))[0], -1]) with x [batch, 3, 4]."""
    return model([node("Relu", ["x"], ["r"]),
                  node("Shape", ["r"], ["s"]),
                  node("Gather", ["s", "zero"], ["d0"], axis=0),
                  node("Unsqueeze", ["d0", "axes0"], ["d0u"]),
                  node("Concat", ["d0u", "minus1"], ["new_shape"], axis=0),
                  node("Reshape", ["r", "new_shape"], ["y"])],
                 [vi("x", [batch, 3, 4])], [vi("y", [batch, 12])],
                 {"zero": np.array(0, np.int64), "axes0": np.array([0], np.int64),
                  "minus1": np.array([-1], np.int64)})


def test_folds_shape_gather_reshape_chain_of_static_shapes():
    before = _reshape_chain(2)
    graph = edgeq.load(before)
    result, ctx = _checked([ShapeInference(), ConstantFolding(), DeadCodeElimination()], graph)
    assert op_types(graph) == ["Relu", "Reshape"]
    reshape = graph.ops_of_type("Reshape")[0]
    shape = graph.constant(graph.inputs_of(reshape)[1])
    assert shape is not None and shape.numpy().tolist() == [2, -1]
    assert [v.name for v in graph.initializers] == [graph.inputs_of(reshape)[1].name]  # the rest is dead
    folding = next(r for r in ctx.records if r.name == "constant-folding")
    assert folding.stats["ops_folded"] == 4  # Shape, Gather, Unsqueeze, Concat
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    _outputs_unchanged(before, graph, {"x": x})


def test_folded_scalars_stay_scalars():
    """np.ascontiguousarray turns a 0-d result into shape [1]; a folded scalar must keep rank 0."""
    before = model([node("Add", ["a", "b"], ["c"]), node("Mul", ["x", "c"], ["y"])],
                   [vi("x", [])], [vi("y", [])], {"a": np.array(1.5, np.float32), "b": np.array(2.0, np.float32)})
    graph = edgeq.load(before)
    _checked([ConstantFolding(), DeadCodeElimination()], graph)
    assert op_types(graph) == ["Mul"]
    folded = graph.value("c").const
    assert folded.dims == () and folded.numpy() == np.float32(3.5)
    _outputs_unchanged(before, graph, {"x": np.array(2.0, np.float32)})


def test_does_not_fold_shape_of_a_dynamic_dimension():
    before = _reshape_chain("batch")
    graph = edgeq.load(before)
    _checked([ShapeInference(), ConstantFolding(), DeadCodeElimination()], graph)
    assert "Shape" in op_types(graph)
    for batch in (1, 5):  # the folded model must still serve every batch size
        x = np.random.default_rng(batch).standard_normal((batch, 3, 4)).astype(np.float32)
        _outputs_unchanged(before, graph, {"x": x})


def test_constant_nodes_become_initializers():
    tensor = helper.make_tensor("v", TensorProto.FLOAT, [3], [1, 2, 3])
    before = model([node("Constant", [], ["c_tensor"], value=tensor),
                    node("Constant", [], ["c_float"], value_float=0.5),
                    node("Constant", [], ["c_ints"], value_ints=[1, 3]),
                    node("Add", ["x", "c_tensor"], ["a"]),
                    node("Mul", ["a", "c_float"], ["m"]),
                    node("Reshape", ["m", "c_ints"], ["y"])],
                   [vi("x", [3])], [vi("y", [1, 3])])
    graph = edgeq.load(before)
    result, ctx = _checked([ConstantFolding()], graph)
    assert op_types(graph) == ["Add", "Mul", "Reshape"]
    assert ctx.records[0].stats["constant_nodes_to_initializers"] == 3
    values = {v.name: v.const.numpy() for v in graph.initializers}
    assert values["c_tensor"].tolist() == [1.0, 2.0, 3.0] and values["c_tensor"].dtype == np.float32
    assert values["c_float"].tolist() == 0.5 and values["c_ints"].dtype == np.int64
    _outputs_unchanged(before, graph, {"x": np.array([1.0, -2.0, 3.5], np.float32)})


def test_constant_folding_keeps_a_constant_that_is_a_graph_output():
    before = model([node("Constant", [], ["c"], value_floats=[1.0, 2.0]), node("Relu", ["x"], ["y"])],
                   [vi("x", [2])], [vi("c", [2]), vi("y", [2])])
    graph = edgeq.load(before)
    result, _ = _checked([ConstantFolding()], graph)
    assert op_types(graph) == ["Constant", "Relu"]
    assert result.modified is False
    _outputs_unchanged(before, graph, {"x": np.array([-1.0, 1.0], np.float32)})


def test_constant_folding_reports_no_change_for_a_constant_op_it_cannot_fold():
    """An all-constant op whose output is a graph output stays; the pass must not claim it folded
    it, or a fixed-point pipeline never settles."""
    before = model([node("Add", ["c1", "c2"], ["y"]), node("Relu", ["x"], ["z"])],
                   [vi("x", [2])], [vi("y", [2]), vi("z", [2])],
                   {"c1": np.array([1.0, 2.0], np.float32), "c2": np.array([3.0, 4.0], np.float32)})
    graph = edgeq.load(before)
    result, _ = _checked([ConstantFolding()], graph)
    assert op_types(graph) == ["Add", "Relu"]
    assert result.stats["ops_folded"] == 0
    assert result.modified is False
    ctx = PassContext()
    PassManager([ConstantFolding()], until_fixed_point=True, max_iterations=8)(graph, ctx)
    assert len(leaf_records(ctx.records)) == 1
    _outputs_unchanged(before, graph, {"x": np.array([-1.0, 1.0], np.float32)})


def test_constant_folding_leaves_overridable_initializers_alone():
    """An initializer that is also a graph input is a default the caller may override: folding
    it would bake the default in."""
    before = model([node("Mul", ["b", "two"], ["b2"]), node("Add", ["x", "b2"], ["y"])],
                   [vi("x", [2]), vi("b", [2])], [vi("y", [2])],
                   {"b": np.array([1.0, 1.0], np.float32), "two": np.array(2.0, np.float32)})
    graph = edgeq.load(before)
    _checked([ConstantFolding(), DeadCodeElimination()], graph)
    assert "Mul" in op_types(graph)
    x = np.zeros(2, np.float32)
    _outputs_unchanged(before, graph, {"x": x})  # the default
    _outputs_unchanged(before, graph, {"x": x, "b": np.array([5.0, -3.0], np.float32)})  # overridden


def test_constant_folding_never_refloats_quantized_weights():
    """DequantizeLinear of an integer weight is the quantized format itself, not foldable work."""
    before = model([node("DequantizeLinear", ["wq", "ws", "wz"], ["w"]), node("MatMul", ["x", "w"], ["y"])],
                   [vi("x", [1, 4])], [vi("y", [1, 2])],
                   {"wq": np.arange(8, dtype=np.int8).reshape(4, 2), "ws": np.array(0.5, np.float32),
                    "wz": np.array(0, np.int8)})
    graph = edgeq.load(before)
    result, _ = _checked([ConstantFolding()], graph)
    assert op_types(graph) == ["DequantizeLinear", "MatMul"] and not result.modified
    assert graph.value("wq").const.elem_type == TensorProto.INT8


def test_fold_weights_false_keeps_weight_sized_work_but_folds_shape_work():
    w = np.random.default_rng(0).standard_normal((128, 256)).astype(np.float32)  # 128 KiB
    before = model([node("Transpose", ["w"], ["wt"], perm=[1, 0]), node("MatMul", ["x", "wt"], ["m"]),
                    node("Shape", ["m"], ["s"]), node("Reshape", ["m", "s"], ["y"])],
                   [vi("x", [1, 256])], [vi("y", [1, 128])], {"w": w})
    x = np.random.default_rng(1).standard_normal((1, 256)).astype(np.float32)
    graph = edgeq.load(before)
    _checked([ShapeInference(), ConstantFolding(fold_weights=False), DeadCodeElimination()], graph)
    # Reshape(m, Shape(m)) is the identity once the shape is known: it goes altogether.
    assert op_types(graph) == ["Transpose", "MatMul"]
    _outputs_unchanged(before, graph, {"x": x})
    graph = edgeq.load(before)
    _checked([ShapeInference(), ConstantFolding(), DeadCodeElimination()], graph)
    assert op_types(graph) == ["MatMul"]
    assert [v.const.dims for v in graph.initializers if v.const.nbytes > 1024] == [(256, 128)]
    _outputs_unchanged(before, graph, {"x": x}, exact=False)
    graph = edgeq.load(before)
    _checked([ConstantFolding(max_output_bytes=64 << 10)], graph)
    assert "Transpose" in op_types(graph)


def test_folds_the_static_dims_of_a_partly_dynamic_shape():
    """onnxscript's symbolic shapes: Shape(x)[2] of x [batch, seq, 8] is 8 whatever batch and
    seq are, while Shape(x)[0] stays computed."""
    before = model([node("Shape", ["x"], ["s"]), node("Gather", ["s", "two"], ["d"], axis=0),
                    node("Gather", ["s", "zero"], ["b"], axis=0), node("Cast", ["d"], ["df"], to=TensorProto.FLOAT),
                    node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT), node("Mul", ["x", "df"], ["xd"]),
                    node("Mul", ["xd", "bf"], ["y"])],
                   [vi("x", ["batch", "seq", 8])], [vi("y", ["batch", "seq", 8])],
                   {"two": np.array(2, np.int64), "zero": np.array(0, np.int64)})
    graph = edgeq.load(before)
    result, _ = _checked([ConstantFolding(), DeadCodeElimination()], graph)
    mul = graph.ops_of_type("Mul")[0]
    assert graph.constant(graph.inputs_of(mul)[1]).numpy() == np.float32(8.0)  # Cast(Shape(x)[2]) folded
    assert op_types(graph).count("Shape") == 1 and op_types(graph).count("Cast") == 1  # batch stays computed
    for batch in (1, 3):
        _outputs_unchanged(before, graph, {"x": np.ones((batch, 2, 8), np.float32)})


def test_folds_cast_chains_constant_of_shape_and_no_op_movement():
    before = model([node("Cast", ["c"], ["c16"], to=TensorProto.FLOAT16), node("Cast", ["c16"], ["c32"], to=TensorProto.FLOAT),
                    node("ConstantOfShape", ["dims"], ["zeros"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
                    node("Add", ["x", "c32"], ["a"]), node("Add", ["a", "zeros"], ["b"]),
                    node("Reshape", ["b", "same"], ["r"]), node("Expand", ["r", "same"], ["y"])],
                   [vi("x", [2, 3])], [vi("y", [2, 3])],
                   {"c": np.array([1.0, 2.0, 3.0], np.float32), "dims": np.array([2, 3], np.int64),
                    "same": np.array([2, 3], np.int64)})
    graph = edgeq.load(before)
    result, _ = _checked([ConstantFolding(), DeadCodeElimination()], graph)
    assert op_types(graph) == ["Add", "Add"]  # Cast chain and ConstantOfShape folded, Reshape/Expand gone
    assert result.stats["ops_folded"] == 3 and result.stats["ops_simplified"] == 2
    assert graph.constant(graph.inputs_of(graph.ops_of_type("Add")[1])[1]).numpy().tolist() == [[0.5] * 3] * 2
    _outputs_unchanged(before, graph, {"x": np.arange(6, dtype=np.float32).reshape(2, 3)})


def test_weights_over_the_limit_are_never_copied_or_folded():
    """Weights over the size limit reach onnxscript as typed inputs: nothing computed from them
    folds, their shape still does, and every weight keeps its own Tensor (no copy through
    protobuf) even when the graph around it was rebuilt."""
    rng = np.random.default_rng(0)
    big, small = rng.standard_normal((64, 32)).astype(np.float32), rng.standard_normal((32,)).astype(np.float32)
    before = model([node("Transpose", ["big"], ["big_t"], perm=[1, 0]), node("Shape", ["big"], ["s"]),
                    node("Neg", ["small"], ["neg_small"]), node("MatMul", ["x", "big"], ["m"]),
                    node("Add", ["m", "neg_small"], ["a"]), node("Reshape", ["a", "s_last"], ["r"]),
                    node("MatMul", ["r", "big_t"], ["y"])],
                   [vi("x", [2, 64])], [vi("y", [2, 64])],
                   {"big": big, "small": small, "s_last": np.array([2, 32], np.int64)})
    graph = edgeq.load(before)
    big_tensor = graph.value("big").const
    result, _ = _checked([ConstantFolding(max_output_bytes=4096), DeadCodeElimination()], graph)
    assert result.stats["ops_folded"] >= 1  # Neg(small)
    assert "Transpose" in op_types(graph) and "Neg" not in op_types(graph)
    assert graph.value("big").const is big_tensor
    _outputs_unchanged(before, graph, {"x": rng.standard_normal((2, 64)).astype(np.float32)}, exact=False)


def test_if_with_a_constant_condition_is_inlined():
    then_g = helper.make_graph([node("Neg", ["x"], ["t"])], "then", [], [vi("t", [2])])
    else_g = helper.make_graph([node("Abs", ["x"], ["e"])], "else", [], [vi("e", [2])])
    before = model([node("If", ["cond"], ["i"], then_branch=then_g, else_branch=else_g), node("Relu", ["i"], ["y"])],
                   [vi("x", [2])], [vi("y", [2])], {"cond": np.array(True)})
    graph = edgeq.load(before)
    _checked([ConstantFolding(), DeadCodeElimination()], graph)
    assert op_types(graph) == ["Neg", "Relu"]
    _outputs_unchanged(before, graph, {"x": np.array([-1.0, 2.0], np.float32)})


# ---- identity elimination ------------------------------------------------------------------


def test_removes_identity_and_inference_dropout_but_keeps_dropout_whose_mask_is_read():
    before = model([node("Identity", ["x"], ["i"]), node("Relu", ["i"], ["r"]),
                    node("Dropout", ["r"], ["d"]), node("Neg", ["d"], ["n"]),
                    node("Dropout", ["n"], ["d2", "mask"]), node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
                    node("Add", ["d2", "m"], ["y"])],
                   [vi("x", [3])], [vi("y", [3])])
    graph = edgeq.load(before)
    result, _ = _checked([IdentityElimination()], graph)
    assert result.stats["ops_removed"] == 2
    assert op_types(graph) == ["Relu", "Neg", "Dropout", "Cast", "Add"]
    _outputs_unchanged(before, graph, {"x": np.array([-1.0, 0.0, 2.0], np.float32)})


def test_identity_producing_a_graph_output_keeps_the_output_name():
    before = model([node("Relu", ["x"], ["r"]), node("Identity", ["r"], ["y"]), node("Neg", ["r"], ["z"])],
                   [vi("x", [2])], [vi("y", [2]), vi("z", [2])])
    graph = edgeq.load(before)
    result, _ = _checked([IdentityElimination()], graph)
    assert result.stats["ops_removed"] == 1
    assert op_types(graph) == ["Relu", "Neg"]
    assert [v.name for v in graph.outputs] == ["y", "z"]
    assert graph.outputs_of(graph.ops_of_type("Relu")[0])[0].name == "y"
    _outputs_unchanged(before, graph, {"x": np.array([-1.0, 2.0], np.float32)})


@pytest.mark.parametrize("case", ["graph input", "initializer", "other graph output"])
def test_identity_to_a_graph_output_stays_when_its_source_cannot_take_the_name(case):
    nodes = [node("Relu", ["x"], ["r"]), node("Identity", [{"graph input": "x", "initializer": "c",
                                                            "other graph output": "r"}[case]], ["y"])]
    outputs = [vi("y", [2])] + ([vi("r", [2])] if case == "other graph output" else [])
    before = model(nodes, [vi("x", [2])], outputs, {"c": np.array([3.0, 4.0], np.float32)})
    graph = edgeq.load(before)
    result, _ = _checked([IdentityElimination(), DeadCodeElimination()], graph)
    assert result.stats["ops_removed"] == 0 and "Identity" in op_types(graph)
    assert [v.name for v in graph.outputs] == [v.name for v in before.graph.output]
    _outputs_unchanged(before, graph, {"x": np.array([-1.0, 2.0], np.float32)})


def _if_model(then_reads: list[str], else_reads: list[str], *, identity_output_is_graph_output: bool):
    """r = Relu(x); i = Identity(r); z = If(cond) reading outer names in its branches."""
    def branch(name, reads, op_type):
        out = f"{name}_out"
        nodes = [node(op_type, [reads[0]], [out])] if len(reads) == 1 else [node("Add", reads, [out])]
        return helper.make_graph(nodes, name, [], [vi(out, [2])])

    outputs = [vi("z", [2])] + ([vi("i", [2])] if identity_output_is_graph_output else [])
    return model([node("Relu", ["x"], ["r"]), node("Identity", ["r"], ["i"]),
                  node("If", ["cond"], ["z"], then_branch=branch("then", then_reads, "Neg"),
                       else_branch=branch("else", else_reads, "Abs"))],
                 [vi("x", [2]), vi("cond", [], TensorProto.BOOL)], outputs)


@pytest.mark.parametrize("then_reads,else_reads,graph_output", [
    (["i"], ["i"], False),          # the subgraphs read the Identity's output
    (["r"], ["r"], True),           # they read its source, whose name the output would take
    (["r", "i"], ["i"], False),     # they read both
])
def test_identity_elimination_with_subgraph_captures(then_reads, else_reads, graph_output):
    before = _if_model(then_reads, else_reads, identity_output_is_graph_output=graph_output)
    graph = edgeq.load(before)
    _checked([IdentityElimination()], graph)
    assert [v.name for v in graph.outputs] == [v.name for v in before.graph.output]
    for cond in (True, False):
        _outputs_unchanged(before, graph, {"x": np.array([-1.0, 2.0], np.float32), "cond": np.array(cond)})


# ---- dead code elimination -----------------------------------------------------------------


def test_dce_removes_dead_ops_and_unused_initializers_but_keeps_graph_inputs():
    before = model([node("Add", ["x", "used"], ["a"]),
                    node("Mul", ["a", "dead_weight"], ["dead1"]), node("Neg", ["dead1"], ["dead2"]),
                    node("Relu", ["a"], ["y"])],
                   [vi("x", [2]), vi("unused_input", [2]), vi("overridable", [2])], [vi("y", [2])],
                   {"used": np.ones(2, np.float32), "dead_weight": np.ones(2, np.float32),
                    "orphan": np.zeros(5, np.float32), "overridable": np.zeros(2, np.float32)})
    graph = edgeq.load(before)
    result, _ = _checked([DeadCodeElimination()], graph)
    assert result.stats == {"ops_removed": 2, "initializers_removed": 2}
    assert op_types(graph) == ["Add", "Relu"]
    assert sorted(v.name for v in graph.initializers) == ["overridable", "used"]
    assert [v.name for v in graph.inputs] == ["x", "unused_input", "overridable"]
    _outputs_unchanged(before, graph, {"x": np.array([1.0, -3.0], np.float32),
                                       "unused_input": np.zeros(2, np.float32)})
    again = DeadCodeElimination()(graph)
    assert again.modified is False


def test_dce_keeps_an_op_read_only_from_a_subgraph():
    then_g = helper.make_graph([node("Neg", ["r"], ["t"])], "then", [], [vi("t", [2])])
    else_g = helper.make_graph([node("Identity", ["c"], ["e"])], "else", [], [vi("e", [2])])
    before = model([node("Relu", ["x"], ["r"]),
                    node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
                   [vi("x", [2]), vi("cond", [], TensorProto.BOOL)], [vi("y", [2])],
                   {"c": np.array([7.0, 8.0], np.float32)})
    graph = edgeq.load(before)
    result, _ = _checked([DeadCodeElimination()], graph)
    assert result.modified is False and op_types(graph) == ["Relu", "If"]
    for cond in (True, False):
        _outputs_unchanged(before, graph, {"x": np.array([-1.0, 2.0], np.float32), "cond": np.array(cond)})


# ---- topological sort, shape inference -----------------------------------------------------


def test_topological_sort_renumbers_after_insertions_and_is_idempotent(bert_graph):
    first = bert_graph.topo_order()[3]
    reader, slot = bert_graph.uses(bert_graph.outputs_of(first)[0])[0]
    value = bert_graph.inputs_of(reader)[slot]
    neg = bert_graph.add_op("Neg", [value], ["inserted_neg"], before=reader)
    neg2 = bert_graph.add_op("Neg", bert_graph.outputs_of(neg), ["inserted_neg2"], before=reader)
    bert_graph.set_input(reader, slot, bert_graph.outputs_of(neg2)[0])
    result, _ = _checked([TopologicalSort()], bert_graph)
    assert result.modified is True
    order = bert_graph.topo_order()
    assert [op.order for op in order] == [float(i) for i in range(len(order))]
    assert order.index(neg) < order.index(neg2) < order.index(reader)
    assert TopologicalSort()(bert_graph).modified is False


def test_shape_inference_types_untyped_values_and_respects_existing_types(bert_graph):
    untyped = [v for v in bert_graph.values() if v.const is None and v not in bert_graph.inputs
               and v not in bert_graph.outputs]
    saved = {v.name: (v.elem_type, v.shape) for v in untyped}
    for v in untyped:
        v.type = None
    result, _ = _checked([ShapeInference()], bert_graph)
    assert result.stats["values_typed"] == len(untyped)
    for v in untyped:
        assert v.elem_type is not None, v.name
        if saved[v.name][0] is not None:
            assert v.elem_type == saved[v.name][0], v.name
    assert ShapeInference()(bert_graph).modified is False


@pytest.mark.parametrize("training, removed", [(False, True), (True, None)])
def test_dropout_in_inference_mode_goes_and_in_training_mode_is_refused(training, removed):
    """torch.onnx exports a model left in training mode with Dropout(x, ratio, training_mode=True):
    its outputs are random, which no quantization can fix: a one-line error says how to re-export."""
    from edgeq.errors import OptionError

    graph = edgeq.load(model([helper.make_node("Dropout", ["x", "ratio", "mode"], ["d"], name="drop"),
                              helper.make_node("Relu", ["d"], ["y"])],
                             [vi("x", [2, 3])], [vi("y", [2, 3])],
                             {"ratio": np.array(0.1, np.float32), "mode": np.array(training)}))
    if removed:
        IdentityElimination()(graph)
        assert op_types(graph) == ["Relu"]
    else:
        with pytest.raises(OptionError, match="training mode.*model.eval"):
            IdentityElimination()(graph)
