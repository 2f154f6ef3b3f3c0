"""Transformer structure found by patterns (never by names) on the synthetic BERT and Llama and
on a decomposed LayerNorm; the op names below only check the answers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import edgeq
from edgeq.ir import graph_to_proto
from edgeq.frontend.patterns import Role, find_roles
from tests.passes.helpers import model, vi

node = helper.make_node
LAYERS = (0, 1)


def _names(roles, role: Role) -> set[str]:
    return {op.name for op, r in roles.of_op.items() if r == role}


def _block_types(roles, role: Role) -> list[list[str]]:
    return [[op.op_type for op in block] for block in roles.blocks[role]]


def test_bert_roles(bert_graph):
    before = graph_to_proto(bert_graph).SerializeToString()
    roles = find_roles(bert_graph)
    assert graph_to_proto(bert_graph).SerializeToString() == before  # an analysis: no mutation
    assert _block_types(roles, Role.LAYER_NORM) == [["LayerNormalization"]] * 5
    assert _block_types(roles, Role.GELU) == [["Div", "Erf", "Add", "Mul", "Mul"]] * 2
    assert _block_types(roles, Role.SOFTMAX) == [["Softmax"]] * 2
    assert Role.RMS_NORM not in roles.blocks and Role.SILU not in roles.blocks
    linears = {f"/encoder/layer.{i}/{path}/MatMul" for i in LAYERS
               for path in ("attention/self/query", "attention/self/key", "attention/self/value",
                            "attention/output/dense", "intermediate/dense", "output/dense")}
    assert _names(roles, Role.LINEAR) == linears
    assert _names(roles, Role.ATTENTION_MATMUL) == {f"/encoder/layer.{i}/attention/self/{m}"
                                                   for i in LAYERS for m in ("MatMul", "MatMul_1")}
    embeddings = {bert_graph.inputs_of(op)[0].name for op in roles.of_op if roles.role(op) == Role.EMBEDDING}
    assert embeddings == {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                          "embeddings.token_type_embeddings.weight"}
    # GELU's blocks belong to the MLP of each layer.
    for block in roles.blocks[Role.GELU]:
        assert all("intermediate_act_fn" in op.name for op in block)


def test_llama_roles(llama_graph):
    roles = find_roles(llama_graph)
    assert _block_types(roles, Role.RMS_NORM) == [["Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul", "Mul"]] * 5
    norm_modules = {op.name.rsplit("/", 1)[0] for block in roles.blocks[Role.RMS_NORM] for op in block}
    assert norm_modules == {f"/model/layers.{i}/{n}" for i in LAYERS
                            for n in ("input_layernorm", "post_attention_layernorm")} | {"/model/norm"}
    assert _block_types(roles, Role.SILU) == [["Sigmoid", "Mul"]] * 2
    assert _block_types(roles, Role.SOFTMAX) == [["Softmax"]] * 2
    assert Role.LAYER_NORM not in roles.blocks and Role.GELU not in roles.blocks
    linears = {f"/model/layers.{i}/{p}/MatMul" for i in LAYERS
               for p in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
                         "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")}
    assert _names(roles, Role.LINEAR) == linears | {"/lm_head/MatMul"}
    assert _names(roles, Role.ATTENTION_MATMUL) == {f"/model/layers.{i}/self_attn/{m}"
                                                   for i in LAYERS for m in ("MatMul", "MatMul_1")}
    assert len(roles.blocks[Role.EMBEDDING]) == 1


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_residual_adds_are_exactly_the_skip_connections(which, bert_graph, llama_graph):
    graph = bert_graph if which == "bert" else llama_graph
    expected = ({f"/encoder/layer.{i}/{m}/Add" for i in LAYERS for m in ("attention/output", "output")}
                if which == "bert" else {f"/model/layers.{i}/{a}" for i in LAYERS for a in ("Add", "Add_1")})
    assert _names(find_roles(graph), Role.RESIDUAL_ADD) == expected


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_every_skip_connection_is_a_residual_add(which, bert_graph, llama_graph):
    """The part of residual detection that holds today: no skip connection is missed."""
    graph = bert_graph if which == "bert" else llama_graph
    expected = ({f"/encoder/layer.{i}/{m}/Add" for i in LAYERS for m in ("attention/output", "output")}
                if which == "bert" else {f"/model/layers.{i}/{a}" for i in LAYERS for a in ("Add", "Add_1")})
    found = _names(find_roles(graph), Role.RESIDUAL_ADD)
    assert expected <= found
    # Bias adds of linear layers (constant operand) are never residual.
    assert not any(name.endswith(("query/Add", "dense/Add")) for name in found)


def _decomposed_layer_norm(tail: bool = True) -> onnx.ModelProto:
    """LayerNorm as exporters decompose it, then a linear layer."""
    rng = np.random.default_rng(0)
    nodes = [node("ReduceMean", ["x"], ["mean"], axes=[-1]), node("Sub", ["x", "mean"], ["d"]),
             node("Pow", ["d", "two"], ["sq"]), node("ReduceMean", ["sq"], ["var"], axes=[-1]),
             node("Add", ["var", "eps"], ["ve"]), node("Sqrt", ["ve"], ["std"]), node("Div", ["d", "std"], ["n"])]
    last = "n"
    if tail:
        nodes += [node("Mul", ["n", "gamma"], ["g"]), node("Add", ["g", "beta"], ["b"])]
        last = "b"
    nodes.append(node("MatMul", [last, "w"], ["y"]))
    return model(nodes, [vi("x", [1, 4, 8])], [vi("y", [1, 4, 3])],
                 {"two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32),
                  "gamma": rng.standard_normal(8).astype(np.float32), "beta": rng.standard_normal(8).astype(np.float32),
                  "w": rng.standard_normal((8, 3)).astype(np.float32)})


@pytest.mark.parametrize("tail", [True, False])
def test_decomposed_layer_norm(tail):
    graph = edgeq.load(_decomposed_layer_norm(tail))
    roles = find_roles(graph)
    expected = ["ReduceMean", "Sub", "Pow", "ReduceMean", "Add", "Sqrt", "Div"] + (["Mul", "Add"] if tail else [])
    assert _block_types(roles, Role.LAYER_NORM) == [expected]
    assert Role.RMS_NORM not in roles.blocks
    assert _names(roles, Role.LINEAR) == {op.name for op in graph.ops_of_type("MatMul")}
    assert Role.RESIDUAL_ADD not in roles.blocks  # the eps and beta adds are part of the norm


def test_linear_through_transposed_weight_and_attention_matmul():
    rng = np.random.default_rng(1)
    m = model([node("Transpose", ["w"], ["wt"], perm=[1, 0]), node("MatMul", ["x", "wt"], ["h"]),
               node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]), node("MatMul", ["h", "ht"], ["y"])],
              [vi("x", [1, 4, 8])], [vi("y", [1, 4, 4])], {"w": rng.standard_normal((6, 8)).astype(np.float32)})
    graph = edgeq.load(m)
    roles = find_roles(graph)
    first, second = graph.ops_of_type("MatMul")
    assert roles.role(first) == Role.LINEAR
    assert roles.role(second) == Role.ATTENTION_MATMUL


def test_compiled_forms_keep_their_roles():
    """A linear whose weight is DequantizeLinear(int8 constant), an integer MatMulInteger and a
    com.microsoft MatMulNBits are linears; Q -> DQ pairs on activations are looked through (SiLU
    with its x quantized on one side); an activation x activation MatMulInteger is attention."""
    rng = np.random.default_rng(0)
    inits = {"wq": rng.integers(-8, 8, (8, 8)).astype(np.int8), "ws": np.array(0.1, np.float32),
             "s": np.array(0.05, np.float32), "z": np.array(128, np.uint8), "wz": np.array(0, np.int8),
             "w_packed": rng.integers(0, 255, (8, 1, 4)).astype(np.uint8), "w_scales": np.ones(8, np.float32)}
    nodes = [node("QuantizeLinear", ["x", "s", "z"], ["xq"]), node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             node("DequantizeLinear", ["wq", "ws", "wz"], ["w"]), node("MatMul", ["xd", "w"], ["h"]),
             node("QuantizeLinear", ["h", "s", "z"], ["hq"]), node("DequantizeLinear", ["hq", "s", "z"], ["hd"]),
             node("Sigmoid", ["h"], ["sig"]), node("Mul", ["hd", "sig"], ["silu"]),
             node("MatMulInteger", ["xq", "wq", "z", "wz"], ["acc"]),
             node("MatMulInteger", ["xq", "hq", "z", "z"], ["scores"]),
             node("MatMulNBits", ["silu", "w_packed", "w_scales"], ["nb"], domain="com.microsoft", K=8, N=8,
                  bits=4, block_size=8)]
    graph = edgeq.load(helper.make_model(
        helper.make_graph(nodes, "compiled", [vi("x", [2, 8])],
                          [vi("acc", [2, 8], onnx.TensorProto.INT32), vi("scores", [2, 8], onnx.TensorProto.INT32),
                           vi("nb", [2, 8])],
                          [onnx.numpy_helper.from_array(a, n) for n, a in inits.items()]),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]))
    roles = find_roles(graph)
    names = lambda role: sorted(op.op_type + ":" + graph.outputs_of(op)[0].name for op in roles.of_op
                                if roles.of_op[op] == role)
    assert names(Role.LINEAR) == ["MatMul:h", "MatMulInteger:acc", "MatMulNBits:nb"]
    assert names(Role.ATTENTION_MATMUL) == ["MatMulInteger:scores"]
    assert names(Role.SILU) == ["Mul:silu", "Sigmoid:sig"]
