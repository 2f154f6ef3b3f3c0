"""canonicalize-shapes on small hand-built graphs: each computed shape becomes the constant the
canonical form names (decided by probing, so the graphs compute the same at every size), the
shape ops behind it die, and what cannot be written so is left with its reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edgeq
from edgeq.frontend import shape_rewrites
from edgeq.ir import Graph
from edgeq.passes.canonicalize_shapes import CanonicalizeShapes
from edgeq.passes.constant_folding import ConstantFolding
from edgeq.passes.dead_code_elimination import DeadCodeElimination
from edgeq.pipeline import PassContext, PassManager, VerifyInstrument
from tests.passes.helpers import assert_valid, model, op_types, run, vi

node = helper.make_node
I64 = TensorProto.INT64
SIZES = ((1, 3), (2, 5), (4, 9))  # (batch, seq) the outputs are compared at


def _ints(**arrays) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.int64) for k, v in arrays.items()}


def _dim(source: str, axis: int, out: str) -> list[onnx.NodeProto]:
    """out = [Shape(source)[axis]] (1-D), as the TorchScript exporter writes it."""
    return [node("Shape", [source], [f"{out}_shape"]), node("Gather", [f"{out}_shape", f"i{axis}"], [f"{out}_s"], axis=0),
            node("Unsqueeze", [f"{out}_s", "ax0"], [out])]


def _canonicalize(before: onnx.ModelProto) -> tuple[Graph, dict]:
    graph = edgeq.load(before)
    ctx = PassContext(instruments=[VerifyInstrument(with_onnxruntime=True)])
    PassManager([ConstantFolding(), CanonicalizeShapes(), DeadCodeElimination()])(graph, ctx)
    assert_valid(graph)
    return graph, next(r for r in ctx.records if r.name == "canonicalize-shapes").stats


def _same_outputs(before: onnx.ModelProto, graph: Graph, shape_of) -> None:
    """ORT outputs of the rewritten graph equal the original's at several batch/sequence sizes."""
    rng = np.random.default_rng(0)
    for batch, seq in SIZES:
        feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shape_of(batch, seq).items()}
        for e, a in zip(run(before, feeds, optimize=False), run(graph, feeds, optimize=False)):
            assert e.shape == a.shape and np.array_equal(e, a)


def _shape_of(graph: Graph, op_type: str) -> list[int]:
    op = graph.ops_of_type(op_type)[0]
    const = graph.constant(graph.inputs_of(op)[1])
    assert const is not None, f"{op_type} shape is still computed"
    return const.numpy().tolist()


def test_head_split_reshape_from_shape_gathers_becomes_0_0_h_d():
    before = model(_dim("x", 0, "b") + _dim("x", 1, "s") + [
        node("Concat", ["b", "s", "heads", "head_dim"], ["shape"], axis=0),
        node("Reshape", ["x", "shape"], ["y"])],
        [vi("x", ["batch", "seq", 8])], [vi("y", ["batch", "seq", 2, 4])],
        _ints(i0=0, i1=1, ax0=[0], heads=[2], head_dim=[4]))
    graph, stats = _canonicalize(before)
    assert _shape_of(graph, "Reshape") == [0, 0, 2, 4]
    assert op_types(graph) == ["Reshape"]  # the Shape/Gather/Unsqueeze/Concat died with it
    assert stats["reshapes_to_constant"] == 1 and stats["probes"] == 3
    _same_outputs(before, graph, lambda b, s: {"x": (b, s, 8)})


def test_flatten_to_minus_one_hidden():
    """[batch * seq, hidden] from Mul(Shape gathers): -1 and the literal hidden size."""
    before = model(_dim("x", 0, "b") + _dim("x", 1, "s") + [
        node("Mul", ["b", "s"], ["bs"]), node("Concat", ["bs", "hidden"], ["shape"], axis=0),
        node("Reshape", ["x", "shape"], ["y"])],
        [vi("x", ["batch", "seq", 8])], [vi("y", ["rows", 8])],
        _ints(i0=0, i1=1, ax0=[0], hidden=[8]))
    graph, _ = _canonicalize(before)
    assert _shape_of(graph, "Reshape") == [-1, 8]
    assert "Shape" not in op_types(graph)
    _same_outputs(before, graph, lambda b, s: {"x": (b, s, 8)})


def test_gqa_repeat_expand_and_merge_reshape():
    """k [B, 2, S, 4] -> Unsqueeze -> Expand [B, 2, 3, S, 4] -> Reshape [B, 6, S, 4]: the
    canonical GQA repeat, Expand [1, 1, n_rep, 1, 1] and Reshape [0, H, -1, d]."""
    before = model(_dim("k", 0, "b") + _dim("k", 2, "s") + [
        node("Unsqueeze", ["k", "ax2"], ["k5"]),
        node("Concat", ["b", "kv_heads", "n_rep", "s", "head_dim"], ["expand_shape"], axis=0),
        node("Expand", ["k5", "expand_shape"], ["rep"]),
        node("Concat", ["b", "heads", "s", "head_dim"], ["merge_shape"], axis=0),
        node("Reshape", ["rep", "merge_shape"], ["y"])],
        [vi("k", ["batch", 2, "seq", 4])], [vi("y", ["batch", 6, "seq", 4])],
        _ints(i0=0, i2=2, ax0=[0], ax2=[2], kv_heads=[2], n_rep=[3], heads=[6], head_dim=[4]))
    graph, stats = _canonicalize(before)
    assert _shape_of(graph, "Expand") == [1, 1, 3, 1, 1]
    assert _shape_of(graph, "Reshape") == [0, 6, -1, 4]
    assert op_types(graph) == ["Unsqueeze", "Expand", "Reshape"]
    assert stats["expands_to_constant"] == 1 and stats["reshapes_to_constant"] == 1
    _same_outputs(before, graph, lambda b, s: {"k": (b, 2, s, 4)})


def test_flatten_transpose_unflatten_chain_becomes_one_transpose():
    """The dynamo exporter's k^T: Reshape(k, [-1, S, d]) -> Transpose([0, 2, 1]) ->
    Reshape([B, H, d, S]) is Transpose(k, [0, 1, 3, 2])."""
    before = model(_dim("k", 0, "b") + _dim("k", 2, "s") + [
        node("Concat", ["minus1", "s", "head_dim"], ["flat_shape"], axis=0),
        node("Reshape", ["k", "flat_shape"], ["flat"]),
        node("Transpose", ["flat"], ["flat_t"], perm=[0, 2, 1]),
        node("Concat", ["b", "heads", "head_dim", "s"], ["unflat_shape"], axis=0),
        node("Reshape", ["flat_t", "unflat_shape"], ["kt"]),
        node("Neg", ["kt"], ["y"])],
        [vi("k", ["batch", 3, "seq", 4])], [vi("y", ["batch", 3, 4, "seq"])],
        _ints(i0=0, i2=2, ax0=[0], minus1=[-1], heads=[3], head_dim=[4]))
    graph, stats = _canonicalize(before)
    assert op_types(graph) == ["Transpose", "Neg"]
    transpose = graph.ops_of_type("Transpose")[0]
    assert transpose.attr("perm") == [0, 1, 3, 2] and graph.inputs_of(transpose)[0].name == "k"
    assert graph.outputs_of(transpose)[0].name == "kt"  # the chain's result keeps its name
    assert stats["chains_to_transpose"] == 1
    _same_outputs(before, graph, lambda b, s: {"k": (b, 3, s, 4)})


def test_static_shape_arithmetic_behind_a_computed_reshape_folds():
    """The rotary half Div(Shape(q)[3], 2): static once the head split has a constant shape, but
    the folder cannot see it while the Reshape's shape is computed."""
    before = model(_dim("x", 0, "b") + _dim("x", 1, "s") + [
        node("Concat", ["b", "s", "heads", "head_dim"], ["shape"], axis=0),
        node("Reshape", ["x", "shape"], ["q"]),
        node("Shape", ["q"], ["q_shape"]), node("Gather", ["q_shape", "i3"], ["d"], axis=0),
        node("Div", ["d", "two"], ["half"]), node("Unsqueeze", ["half", "ax0"], ["half1"]),
        node("Slice", ["q", "zero1", "half1", "axis3"], ["y"])],
        [vi("x", ["batch", "seq", 8])], [vi("y", ["batch", "seq", 2, 2])],
        _ints(i0=0, i1=1, i3=3, ax0=[0], heads=[2], head_dim=[4], two=2, zero1=[0], axis3=[3]))
    graph, stats = _canonicalize(before)
    assert stats["static_shape_values_to_constant"] == 1
    slice_ = graph.ops_of_type("Slice")[0]
    assert graph.constant(graph.inputs_of(slice_)[2]).numpy().tolist() == [2]
    assert op_types(graph) == ["Reshape", "Slice"]
    _same_outputs(before, graph, lambda b, s: {"x": (b, s, 8)})


def test_what_cannot_be_written_with_constants_is_left_with_its_reason():
    """Reshape [B, S, 8] -> [S, B, 8] needs two inferred dims; Expand to [B, 8] expands to a
    dynamic size; a shape read from a tensor's values is never replaced."""
    before = model(_dim("x", 0, "b") + _dim("x", 1, "s") + [
        node("Concat", ["s", "b", "hidden"], ["swap_shape"], axis=0),
        node("Reshape", ["x", "swap_shape"], ["swapped"]),
        node("Concat", ["b", "hidden"], ["rows_shape"], axis=0),
        node("Expand", ["row", "rows_shape"], ["rows"]),
        node("Reshape", ["rows", "data_shape"], ["y2"])],
        [vi("x", ["batch", "seq", 8]), vi("row", [1, 8]), vi("data_shape", [2], I64)],
        [vi("swapped", ["seq", "batch", 8]), vi("y2", ["a", "b2"])],
        _ints(i0=0, i1=1, ax0=[0], hidden=[8]))
    graph = edgeq.load(before)
    decided = shape_rewrites.plan(graph)
    reasons = {op.name or op.op_type + str(i): why for i, (op, why) in enumerate(decided.left)}
    assert sorted(reasons.values()) == sorted([shape_rewrites.NEEDS_TWO_INFERRED_DIMS,
                                               shape_rewrites.EXPANDS_TO_DYNAMIC, shape_rewrites.READS_VALUES])
    assert not decided.rewrites
    result = CanonicalizeShapes()(graph)
    assert result.modified is False
    assert result.stats["left_two_dynamic_dims_not_at_input_positions"] == 1
    assert result.stats["left_expands_to_a_dynamic_size"] == 1 and result.stats["left_shape_reads_tensor_values"] == 1
    assert_valid(graph)


def test_static_graph_is_not_probed():
    before = model([node("Reshape", ["x", "shape"], ["y"])], [vi("x", [2, 3, 4])], [vi("y", [6, 4])],
                   _ints(shape=[6, 4]))
    graph = edgeq.load(before)
    result = CanonicalizeShapes()(graph)
    assert result.modified is False and result.stats["probes"] == 0


@pytest.mark.parametrize("ins,outs,expected", [
    ([(2, 7, 8), (3, 11, 8)], [(2, 7, 2, 4), (3, 11, 2, 4)], (0, 0, 2, 4)),
    ([(2, 7, 8), (3, 11, 8)], [(14, 8), (33, 8)], (-1, 8)),
    ([(2, 3, 7, 4), (3, 3, 11, 4)], [(2, 12, 7), (3, 12, 11)], (0, 12, 0)),  # B and S stay where they are
    ([(2, 7, 8), (3, 11, 8)], [(7, 2, 8), (11, 3, 8)], shape_rewrites.NEEDS_TWO_INFERRED_DIMS),
    ([(2, 2, 3, 7, 4), (3, 2, 3, 11, 4)], [(2, 6, 7, 4), (3, 6, 11, 4)], (0, 6, -1, 4)),
])
def test_reshape_constant_decisions(ins, outs, expected):
    assert shape_rewrites.reshape_constant(ins, outs) == expected


@pytest.mark.parametrize("ins,outs,expected", [
    ([(2, 2, 1, 7, 4), (3, 2, 1, 11, 4)], [(2, 2, 3, 7, 4), (3, 2, 3, 11, 4)], (1, 1, 3, 1, 1)),
    ([(1, 8), (1, 8)], [(2, 8), (3, 8)], shape_rewrites.EXPANDS_TO_DYNAMIC),
    ([(7,), (11,)], [(1, 7), (1, 11)], (1, 1)),
])
def test_expand_constant_decisions(ins, outs, expected):
    assert shape_rewrites.expand_constant(ins, outs) == expected
