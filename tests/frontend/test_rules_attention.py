"""The attention core: the q/k double scale folded into one Mul on the scores, the NaN guard
removed once nothing before the Softmax can be infinite, com.microsoft Attention and
MultiHeadAttention decomposed (and refused where they cannot be, a shared packed weight
included), GroupQueryAttention without a cache refused (test_group_query_attention.py decomposes
it with one)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.frontend.graphs import (MS, I64, assert_same_outputs, canonicalize, const, kinds, model, node,
                                   rng_array, vi)

B, H, S, Dh = 2, 2, 5, 4
Q, K, V = (rng_array(B, H, S, Dh, seed=s, scale=2.0) for s in (1, 2, 3))
HEADS = [vi(n, ["b", H, "s", Dh]) for n in ("q", "k", "v")]


def _core(scale_nodes, scores: str, *, guard: bool = False, extra=(), inits=()):
    nodes = [node("Transpose", ["k"], ["k_t"], perm=[0, 1, 3, 2]), *scale_nodes,
             node("Softmax", [scores], ["p"], axis=-1)]
    if guard:
        nodes += [node("IsNaN", ["p"], ["nan"]), node("Where", ["nan", "zero", "p"], ["p_safe"])]
    nodes.append(node("MatMul", ["p_safe" if guard else "p", "v"], ["y"]))
    return model([*extra, *nodes], HEADS, [vi("y", ["b", H, "s", Dh])],
                 [const("s", Dh ** -0.25), const("c", math.sqrt(Dh)), const("zero", [0.0]), *inits])


def test_q_and_k_scales_fold_into_one_mul_on_the_scores():
    source = _core([node("Mul", ["q", "s"], ["qs"]), node("Mul", ["k_t", "s"], ["ks"]),
                    node("MatMul", ["qs", "ks"], ["scores"])], "scores")
    graph, stats = canonicalize(source)
    assert stats == {"attention-scale": 1}
    matmul = graph.producer(graph.inputs_of(graph.producer(graph.value("scores")))[0])
    assert matmul.op_type == "MatMul" and [v.name for v in graph.inputs_of(matmul)] == ["q", "k_t"]
    scale = graph.producer(graph.value("scores"))
    assert scale.op_type == "Mul" and float(graph.constant(graph.inputs_of(scale)[1]).numpy()) == pytest.approx(0.5)
    assert kinds(graph) == {"Transpose": 1, "MatMul": 2, "Mul": 1, "Softmax": 1}
    assert_same_outputs(source, graph, {"q": Q, "k": K, "v": V})


def test_a_q_scale_folds_into_the_scores_own_scale():
    source = _core([node("Div", ["q", "c"], ["qs"]), node("MatMul", ["qs", "k_t"], ["raw"]),
                    node("Div", ["raw", "c"], ["scores"])], "scores")
    graph, stats = canonicalize(source)
    assert stats == {"attention-scale": 1}
    div = graph.producer(graph.value("scores"))
    assert div.op_type == "Div" and float(graph.constant(graph.inputs_of(div)[1]).numpy()) == pytest.approx(Dh)
    assert kinds(graph)["Div"] == 1
    assert_same_outputs(source, graph, {"q": Q, "k": K, "v": V})


def test_a_merged_head_split_and_key_transpose_is_split_again():
    """TorchScript writes k^T as Transpose(Reshape(k, [B, S, H, d]), [0, 2, 3, 1])."""
    nodes = [node("Reshape", ["kx", "heads"], ["k4"]), node("Transpose", ["k4"], ["k_t"], perm=[0, 2, 3, 1]),
             node("MatMul", ["q", "k_t"], ["scores"]), node("Softmax", ["scores"], ["p"], axis=-1),
             node("MatMul", ["p", "v"], ["y"])]
    source = model(nodes, [HEADS[0], vi("kx", ["b", "s", H * Dh]), HEADS[2]], [vi("y", ["b", H, "s", Dh])],
                   [const("heads", [0, 0, H, Dh], np.int64)])
    graph, stats = canonicalize(source)
    assert stats == {"attention-key-transpose": 1}
    k_t = graph.producer(graph.value("k_t"))
    split = graph.producer(graph.inputs_of(k_t)[0])
    assert (k_t.attr("perm"), split.attr("perm")) == ([0, 1, 3, 2], [0, 2, 1, 3])
    kx = np.transpose(K, (0, 2, 1, 3)).reshape(B, S, H * Dh)
    assert_same_outputs(source, graph, {"q": Q, "kx": kx, "v": V})


def test_the_nan_guard_goes_when_nothing_before_the_softmax_is_infinite():
    source = _core([node("MatMul", ["q", "k_t"], ["raw"]), node("Mul", ["raw", "s"], ["scores"])], "scores",
                   guard=True)
    graph, stats = canonicalize(source)
    assert stats == {"attention-nan-guard": 1}
    assert "IsNaN" not in kinds(graph) and "Where" not in kinds(graph)
    assert_same_outputs(source, graph, {"q": Q, "k": K, "v": V})


def test_the_nan_guard_stays_behind_an_infinite_bias():
    causal = np.triu(np.full((S, S), -np.inf, np.float32), 1)
    source = _core([node("MatMul", ["q", "k_t"], ["raw"]), node("Add", ["raw", "causal"], ["scores"])], "scores",
                   guard=True, inits=[const("causal", causal)])
    graph, stats = canonicalize(source)
    assert kinds(graph)["IsNaN"] == 1
    assert stats["attention-nan-guard refused: the Softmax input may be -inf ('causal' is not finite)"] == 1


# ---- com.microsoft attention ops --------------------------------------------------------------

D = 8
W = rng_array(D, 3 * D, seed=4, scale=0.4)
BIAS = rng_array(3 * D, seed=5, scale=0.1)
X = rng_array(2, 6, D, seed=6)
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], np.int64)
CAST = node("Cast", ["attention_mask"], ["mask32"], to=6)
IO = dict(inputs=[vi("x", ["b", "s", D]), vi("attention_mask", ["b", "s"], I64)],
          outputs=[vi("y", ["b", "s", D])])


def _attention(unidirectional: int = 0, *, shared: bool = False):
    nodes = [CAST, node("Attention", ["x", "w", "bias", "mask32"], ["y"], domain=MS, num_heads=2,
                        unidirectional=unidirectional)]
    outputs = list(IO["outputs"])
    if shared:  # a second reader of the packed weight
        nodes.append(node("MatMul", ["x", "w"], ["qkv"]))
        outputs.append(vi("qkv", ["b", "s", 3 * D]))
    return model(nodes, IO["inputs"], outputs, [const("w", W), const("bias", BIAS)], ms=True)


@pytest.mark.parametrize("unidirectional,mask_kind", [(0, "key-padding"), (1, "causal+padding")])
def test_microsoft_attention_is_decomposed(unidirectional, mask_kind):
    source = _attention(unidirectional)
    graph, stats = canonicalize(source)
    assert stats["attention-com-microsoft"] == 1 and stats[f"mask {mask_kind}"] == 1
    assert not any(op.domain for op in graph.ops())
    found = kinds(graph)
    assert found["MatMul"] == 5 and found["Softmax"] == 1 and found["Mul"] >= 2
    assert [op.attr("perm") for op in graph.ops_of_type("Transpose")].count([0, 1, 3, 2]) == 1
    assert_same_outputs(source, graph, {"x": X, "attention_mask": MASK})


def test_a_shared_packed_weight_is_refused():
    graph, stats = canonicalize(_attention(shared=True))
    assert kinds(graph)[f"{MS}::Attention"] == 1
    assert stats == {"attention-com-microsoft refused: its packed QKV weight is shared outside the op "
                     "(splitting it would copy it)": 1, f"left as is: {MS}::Attention": 1}


def test_microsoft_multi_head_attention_is_decomposed():
    nodes = [CAST, node("MatMul", ["x", "w"], ["qkv"]), node("Split", ["qkv", "sizes"], ["q", "k", "v"], axis=-1),
             node("MultiHeadAttention", ["q", "k", "v", "bias", "mask32"], ["y"], domain=MS, num_heads=2)]
    source = model(nodes, IO["inputs"], IO["outputs"],
                   [const("w", W), const("bias", BIAS), const("sizes", [D, D, D], np.int64)], ms=True)
    graph, stats = canonicalize(source)
    assert stats["attention-com-microsoft-mha"] == 1 and stats["mask key-padding"] == 1
    assert not any(op.domain for op in graph.ops())
    assert_same_outputs(source, graph, {"x": X, "attention_mask": MASK})


def test_group_query_attention_without_a_cache_is_refused_with_the_reason():
    nodes = [node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens", "total"], ["y", "pk", "pv"], domain=MS,
                  num_heads=2, kv_num_heads=1)]
    source = model(nodes, [vi("q", [1, 4, D]), vi("k", [1, 4, D // 2]), vi("v", [1, 4, D // 2]),
                           vi("seqlens", [1], 6), vi("total", [], 6)], [vi("y", [1, 4, D])], ms=True)
    graph, stats = canonicalize(source)
    assert stats == {"group-query-attention refused: a GroupQueryAttention without past key/value inputs is not "
                     "decomposed yet": 1, f"left as is: {MS}::GroupQueryAttention": 1}
    assert kinds(graph) == {f"{MS}::GroupQueryAttention": 1}
