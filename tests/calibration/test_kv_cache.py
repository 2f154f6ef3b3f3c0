"""Calibration of decoders with a KV cache: the cache found from inputs/outputs, token windows
turned into prefill and decode-step samples whose caches the float model computed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeq.calibration import kv_cache
from edgeq.calibration.sources import TokenWindows, model_inputs, open_source, split
from edgeq.errors import CalibrationError
from edgeq.models import synthetic

VOCAB = synthetic.TINY_LLAMA.vocab_size


@pytest.fixture(scope="module")
def llama_kv(tmp_path_factory) -> Path:
    return synthetic.build_llama_file(tmp_path_factory.mktemp("kv") / "llama_kv.onnx", kv_cache=True)


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, 1000)


def test_find_cache_pairs_every_past_input_with_its_present_output(llama_kv):
    model = onnx.load(llama_kv)
    layout = kv_cache.find_cache(model_inputs(model), kv_cache.model_outputs(model))
    assert [(e.past, e.present) for e in layout.entries] == [
        (f"past_key_values.{i}.{k}", f"present.{i}.{k}") for i in range(2) for k in ("key", "value")]
    assert layout.empty()["past_key_values.0.key"].shape == (1, 2, 0, 16)
    assert kv_cache.cache_kind("past_key_values.3.value") == "value"
    assert kv_cache.cache_kind("past_key_values.3.key") == "key"


def test_a_model_without_cache_has_no_layout(synthetic_llama):
    model = onnx.load(synthetic_llama)
    assert kv_cache.find_cache(model_inputs(model), kv_cache.model_outputs(model)) is None


def test_token_windows_give_a_prefill_then_decode_steps_with_the_float_models_cache(llama_kv, ids):
    source = open_source(TokenWindows(ids, 12, 2, decode_steps=3), str(llama_kv))
    feeds = list(source)
    assert len(source) == len(feeds) == 2 * 4
    assert [f["input_ids"].shape[1] for f in feeds[:4]] == [9, 1, 1, 1]
    assert [f["past_key_values.1.value"].shape[2] for f in feeds[:4]] == [0, 9, 10, 11]
    assert [f["attention_mask"].shape[1] for f in feeds[:4]] == [9, 10, 11, 12]
    # A decode step's logits equal the full window's at that position: its cache is right.
    session = ort.InferenceSession(str(llama_kv), providers=["CPUExecutionProvider"])
    full = session.run(["logits"], {"input_ids": ids[None, :12], "attention_mask": np.ones((1, 12), np.int64),
                                    **synthetic.empty_past(synthetic.TINY_LLAMA)})[0][0]
    step = session.run(["logits"], feeds[3])[0][0, 0]
    np.testing.assert_allclose(step, full[11], atol=1e-5)
    assert feeds[3]["input_ids"][0, 0] == ids[11]


def test_held_out_samples_are_the_last_decode_steps(llama_kv, ids):
    source = open_source(TokenWindows(ids, 12, 3, decode_steps=2), str(llama_kv))
    calib, holdout = split(source, 2)
    assert len(calib) == 7
    assert [f["past_key_values.0.key"].shape[2] for f in holdout] == [10, 11]


def test_windows_too_short_for_the_decode_steps_are_refused(llama_kv, ids):
    with pytest.raises(CalibrationError, match="no prefill"):
        open_source(TokenWindows(ids, 4, 2, decode_steps=4), str(llama_kv))


def test_cache_samples_need_the_model_file(llama_kv, ids):
    skeleton = onnx.load(llama_kv)
    del skeleton.graph.node[:]
    with pytest.raises(CalibrationError, match="need the model file"):
        open_source(TokenWindows(ids, 12, 2), skeleton)


@pytest.mark.parametrize("projection", ["MatMul", "MatMulNBits"])
def test_head_size_from_the_packed_projection(projection):
    """onnxruntime-genai's builder leaves the head size symbolic in the cache dims: it comes from
    the packed q/k/v projection's width (a float weight, or the int4 graph's MatMulNBits N)."""
    from onnx import TensorProto, helper

    heads, kv_heads, head = 4, 2, 16
    width = (heads + 2 * kv_heads) * head
    if projection == "MatMul":
        weight = helper.make_tensor("w", TensorProto.FLOAT, [32, width], np.zeros(32 * width, np.float32))
        node = helper.make_node("MatMul", ["x", "w"], ["qkv"])
    else:
        weight = helper.make_tensor("w", TensorProto.UINT8, [width, 1, 16], np.zeros(width * 16, np.uint8))
        node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["qkv"], domain="com.microsoft", K=32, N=width,
                                bits=4, block_size=32)
    gqa = helper.make_node("GroupQueryAttention", ["qkv", "", "", "pk", "pv", "sl", "tl"], ["o", "k", "v"],
                           domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads)
    graph = helper.make_graph([node, gqa], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 32])],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)], initializer=[weight])
    assert kv_cache.head_size_of(helper.make_model(graph)) == head
