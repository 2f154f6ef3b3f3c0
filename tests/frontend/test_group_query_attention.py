"""com.microsoft GroupQueryAttention with a KV cache (onnxruntime-genai's builder graph: packed
QKV from one MatMul, rotary from cos/sin caches, seqlens_k from the attention mask) decomposed
into the canonical attention core: ONNX Runtime gives the same outputs and cache for a prefill
and the decode steps after it, the packed projection becomes three linears, and the quantized
cache and unsupported options are refused with their reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.ir import load, to_model_proto
from edgeq.pipeline import PassContext, PassManager
from edgeq.registry import get_pass, get_target
from tests.passes.helpers import assert_valid

MS = "com.microsoft"
H, KV, D, HIDDEN, VOCAB, MAX = 4, 2, 16, 64, 64, 64  # ORT's CPU kernel needs head_size % 16 == 0


def _gqa_model(seed: int = 0, **attrs) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inv = 1.0 / (10000.0 ** (np.arange(0, D, 2) / D))
    angles = np.arange(MAX)[:, None] * inv[None, :]
    inits = {"embed": rng.normal(size=(VOCAB, HIDDEN)).astype(np.float32),
             "w_qkv": (rng.normal(size=(HIDDEN, (H + 2 * KV) * D)) * 0.3).astype(np.float32),
             "w_o": (rng.normal(size=(H * D, HIDDEN)) * 0.3).astype(np.float32),
             "cos_cache": np.cos(angles).astype(np.float32), "sin_cache": np.sin(angles).astype(np.float32),
             "one": np.array([1], np.int64), "one_s": np.array(1, np.int64)}
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["x"]),
        helper.make_node("MatMul", ["x", "w_qkv"], ["qkv"]),
        helper.make_node("ReduceSum", ["attention_mask", "one"], ["total_per_row"]),
        helper.make_node("Sub", ["total_per_row", "one"], ["seqlens64"]),
        helper.make_node("Cast", ["seqlens64"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        helper.make_node("Gather", ["mask_shape", "one_s"], ["total64"], axis=0),
        helper.make_node("Cast", ["total64"], ["total"], to=TensorProto.INT32),
        helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key_values.0.key", "past_key_values.0.value",
                                                 "seqlens_k", "total", "cos_cache", "sin_cache"],
                         ["attn", "present.0.key", "present.0.value"], domain=MS, num_heads=H, kv_num_heads=KV,
                         do_rotary=1, scale=1.0 / np.sqrt(D), **attrs),
        helper.make_node("MatMul", ["attn", "w_o"], ["y"]),
    ]
    cache = ["batch", KV, "past", "kv_cache_dim"]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
              helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, cache),
              helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, cache)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
               helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["batch", KV, "total", "kv_cache_dim"]),
               helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, ["batch", KV, "total", "kv_cache_dim"])]
    graph = helper.make_graph(nodes, "gqa", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)],
                             ir_version=8)


def _canonicalize(model: onnx.ModelProto):
    graph = load(model)
    ctx = PassContext(target=get_target("x86-vnni"))
    graph = PassManager([get_pass("constant-folding")(), get_pass("canonicalize")()])(graph, ctx).graph
    return graph, next(r.stats for r in ctx.records if r.name == "canonicalize")


def _steps(session, ids):
    """Prefill of 5 tokens, then three decode steps; every output of every step."""
    names = [o.name for o in session.get_outputs()]
    past = {n: np.zeros((1, KV, 0, D), np.float32) for n in ("past_key_values.0.key", "past_key_values.0.value")}
    results, start = [], 0
    for end in (5, 6, 7, 8):
        out = dict(zip(names, session.run(names, {"input_ids": ids[None, start:end],
                                                  "attention_mask": np.ones((1, end), np.int64), **past})))
        results.append(out)
        past = {"past_key_values.0.key": out["present.0.key"], "past_key_values.0.value": out["present.0.value"]}
        start = end
    return results


def test_decomposed_gqa_matches_onnx_runtime_through_prefill_and_decode():
    source = _gqa_model()
    graph, stats = _canonicalize(source)
    assert stats["group-query-attention"] == 1
    assert not any(op.domain for op in graph.ops())
    assert_valid(graph)
    # The packed projection is three linears; the cache is Concat(past, new) with the static head size.
    weights = sorted(tuple(graph.constant(graph.inputs_of(op)[1]).dims) for op in graph.ops()
                     if op.op_type == "MatMul" and graph.constant(graph.inputs_of(op)[1]) is not None)
    assert weights == sorted([(HIDDEN, H * D), (HIDDEN, KV * D), (HIDDEN, KV * D), (H * D, HIDDEN)])
    assert graph.value("past_key_values.0.key").shape == ("batch", KV, "past", D)
    assert graph.producer(graph.value("present.0.key")).op_type == "Concat"
    ids = np.random.default_rng(1).integers(0, VOCAB, 8)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    expected = _steps(ort.InferenceSession(source.SerializeToString(), options, providers=["CPUExecutionProvider"]), ids)
    got = _steps(ort.InferenceSession(to_model_proto(graph).SerializeToString(), options,
                                      providers=["CPUExecutionProvider"]), ids)
    for want, have in zip(expected, got):
        for name, value in want.items():
            np.testing.assert_allclose(have[name], value, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("attrs,reason", [
    ({"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}, "quantized cache"),
    ({"local_window_size": 16}, "local attention window"),
    ({"softcap": 30.0}, "softcap"),
    ({"rotary_interleaved": 1}, "interleaved rotary"),
])
def test_what_is_not_decomposed_is_refused_with_the_reason(attrs, reason):
    graph, stats = _canonicalize(_gqa_model(**attrs))
    refused = [k for k in stats if k.startswith("group-query-attention refused")]
    assert refused and reason in refused[0]
    assert stats[f"left as is: {MS}::GroupQueryAttention"] == 1


def test_tied_embedding_read_through_a_transpose_gets_its_own_table():
    """onnxruntime-genai's builder ties the embedding to the LM head as Gather(Transpose(W), ids)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(HIDDEN, VOCAB)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["w"], ["table"], perm=[1, 0]),
             helper.make_node("Gather", ["table", "input_ids"], ["x"]),
             helper.make_node("MatMul", ["x", "w"], ["logits"])]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", VOCAB])],
                              [numpy_helper.from_array(w, "w")])
    source = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    ctx = PassContext(target=get_target("x86-vnni"))  # no constant folding: the builder's table is too big for it
    canonical = PassManager([get_pass("canonicalize")()])(load(source), ctx).graph
    stats = next(r.stats for r in ctx.records if r.name == "canonicalize")
    assert stats["embedding-from-transposed-table"] == 1
    gather = next(op for op in canonical.ops() if op.op_type == "Gather")
    np.testing.assert_array_equal(canonical.constant(canonical.inputs_of(gather)[0]).numpy(), w.T)
    assert not [op for op in canonical.ops() if op.op_type == "Transpose"]
    ids = np.array([[3, 1, 4]])
    want = ort.InferenceSession(source.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})
    got = ort.InferenceSession(to_model_proto(canonical).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})
    np.testing.assert_array_equal(got[0], want[0])
