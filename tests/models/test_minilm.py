"""MiniLM built by edgeq matches the sentence-transformers reference embeddings."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeq.models.evaluation import cosine_rows, mean_pool_normalize
from edgeq.models import minilm, synthetic
from tests.models import patterns

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def session(minilm_onnx: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(minilm_onnx), providers=["CPUExecutionProvider"])


def test_embeddings_match_reference(session: ort.InferenceSession, shared_dir: Path) -> None:
    inputs = dict(np.load(shared_dir / "reference" / "minilm_inputs.npz"))
    reference = np.load(shared_dir / "reference" / "minilm_embeddings.npy")
    (hidden,) = session.run(["last_hidden_state"], inputs)
    cosines = cosine_rows(mean_pool_normalize(hidden, inputs["attention_mask"]), reference)
    assert cosines.min() >= 0.99999, cosines


def test_dynamic_batch_and_sequence(session: ort.InferenceSession) -> None:
    ids = np.array([[101, 7592, 2088, 102, 0, 0, 0]] * 3, dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    (hidden,) = session.run(None, {"input_ids": ids, "attention_mask": mask,
                                   "token_type_ids": np.zeros_like(ids)})
    assert hidden.shape == (3, 7, 384)
    for graph_input in session.get_inputs():
        assert graph_input.type == "tensor(int64)" and graph_input.shape == ["batch", "sequence"]


def test_graph_is_shaped_like_the_synthetic_bert(minilm_onnx: Path) -> None:
    """Same op sequence and names as the synthetic fixture at MiniLM's depth: passes tested on
    the fixture meet exactly these patterns here."""
    real = onnx.load(str(minilm_onnx))
    config = minilm.config()
    fake = synthetic.bert(config=replace(synthetic.TINY_BERT, num_layers=config.num_layers))
    assert patterns.op_sequence(real) == patterns.op_sequence(fake)
    g = patterns.Graph(real)
    assert patterns.attention_blocks(g, scale_op="Div") == 6
    assert len(g.of_type("LayerNormalization")) == 13
    assert patterns.linear_weights(g)["encoder.layer.0.attention.self.query.weight"] == (384, 384)
    assert real.opset_import[0].version >= 17
