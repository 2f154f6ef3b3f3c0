"""The synthetic fixtures: fast, seeded, valid, shaped like the real models, outliers where told."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from edgeq.models import synthetic
from tests.models import decoding, patterns


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_builds_in_under_a_second_and_is_seeded() -> None:
    start = time.perf_counter()
    first = [synthetic.bert(3), synthetic.llama(3), synthetic.llama(3, kv_cache=True)]
    assert time.perf_counter() - start < 1.0
    assert synthetic.bert(3).SerializeToString() == first[0].SerializeToString()
    assert synthetic.llama(3).SerializeToString() == first[1].SerializeToString()
    assert synthetic.bert(4).SerializeToString() != first[0].SerializeToString()


@pytest.mark.parametrize("build", [synthetic.bert, synthetic.llama,
                                   lambda: synthetic.llama(kv_cache=True)])
def test_valid_onnx_opset_17(build) -> None:
    model = build()
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17
    assert model.ir_version >= 8


def test_fixture_files_load(synthetic_bert: Path, synthetic_llama: Path) -> None:
    bert, llama = onnx.load(synthetic_bert), onnx.load(synthetic_llama)
    assert [i.name for i in bert.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in bert.graph.output] == ["last_hidden_state"]
    assert [i.name for i in llama.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in llama.graph.output] == ["logits"]
    assert synthetic.outliers(bert) == synthetic.outliers(synthetic.bert(0))


def test_bert_patterns() -> None:
    config = synthetic.TINY_BERT
    g = patterns.Graph(synthetic.bert())
    assert len(g.of_type("LayerNormalization")) == 2 * config.num_layers + 1
    assert patterns.attention_blocks(g, scale_op="Div") == config.num_layers
    assert patterns.gelu_erfs(g) == config.num_layers
    weights = patterns.linear_weights(g)
    assert len(weights) == 6 * config.num_layers
    assert weights["encoder.layer.0.intermediate.dense.weight"] == (config.hidden_size,
                                                                    config.intermediate_size)
    for matmul in g.of_type("MatMul"):
        if matmul.input[1] in g.initializers:  # bias Add follows, bias first as torch writes it
            add = g.only_consumer(matmul)
            assert add.op_type == "Add" and len(g.initializers[add.input[0]].dims) == 1


def test_llama_patterns() -> None:
    config = synthetic.TINY_LLAMA
    g = patterns.Graph(synthetic.llama())
    assert patterns.rms_norms(g) == 2 * config.num_layers + 1
    assert patterns.attention_blocks(g, scale_op="Mul") == config.num_layers
    assert patterns.silus(g) == config.num_layers
    weights = patterns.linear_weights(g)
    assert len(weights) == 7 * config.num_layers + 1  # + the (tied, transposed) lm_head
    assert weights["lm_head.weight"] == (config.hidden_size, config.vocab_size)
    assert not g.of_type("LayerNormalization")


def test_bert_padding_leaves_real_tokens_alone() -> None:
    sess = _session(synthetic.bert())
    feeds = synthetic.bert_feeds(batch=2, seq=16)
    length = int(feeds["attention_mask"][1].sum())
    assert length < 16
    padded = sess.run(None, feeds)[0][1, :length]
    alone = sess.run(None, {k: v[1:2, :length] for k, v in feeds.items()})[0][0]
    np.testing.assert_allclose(padded, alone, atol=1e-4, rtol=1e-4)


def test_llama_kv_cache_matches_full_sequence() -> None:
    feeds = synthetic.llama_feeds(batch=1, seq=12)
    expected = _session(synthetic.llama()).run(["logits"], feeds)[0][0]
    cached = _session(synthetic.llama(kv_cache=True))
    steps = decoding.decode_with_cache(cached, feeds["input_ids"][0], prefill=4)
    np.testing.assert_allclose(steps, expected, atol=1e-5, rtol=1e-5)


def test_activation_outliers_reach_matmul_inputs() -> None:
    model = synthetic.llama(seed=1)
    planted = synthetic.outliers(model)
    q_input = next(n.input[0] for n in model.graph.node if n.name.endswith("q_proj/MatMul"))
    model.graph.output.append(helper.make_tensor_value_info(q_input, onnx.TensorProto.FLOAT, None))
    values = _session(model).run([q_input], synthetic.llama_feeds())[0]
    channel_absmax = np.abs(values).max(axis=(0, 1))
    others = np.delete(channel_absmax, planted.activation_channels)
    assert channel_absmax[planted.activation_channels].min() > 20 * np.median(others)


def test_weight_outliers_where_recorded() -> None:
    model = synthetic.bert(seed=2)
    planted = synthetic.outliers(model)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert len(planted.weights) == 6 * synthetic.TINY_BERT.num_layers
    for name, positions in planted.weights.items():
        w = weights[name]
        rows, cols = zip(*positions)
        assert np.abs(w[rows, cols]).min() >= 50 * synthetic.WEIGHT_STD * 0.999
        mask = np.ones(w.shape, bool)
        mask[rows, cols] = False
        assert np.abs(w[mask]).max() < 10 * synthetic.WEIGHT_STD
