"""SmolLM2 built by edgeq from the Q4_1 GGUF matches the transformers reference."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeq.models import evaluation
from edgeq.models import smollm2, synthetic
from tests.models import decoding, patterns


@pytest.fixture(scope="module")
def session(smollm2_onnx: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(smollm2_onnx), providers=["CPUExecutionProvider"])


def _window0(shared_dir: Path, length: int) -> np.ndarray:
    return evaluation.smollm2_windows(shared_dir, 0, 1)[0, :length]


def test_unpermute_inverts_llama_cpp_permute() -> None:
    """llama.cpp's convert_hf_to_gguf `permute`, reimplemented, then undone."""
    heads, pairs, cols = 3, 4, 5
    hf = np.arange(heads * 2 * pairs * cols, dtype=np.float32).reshape(heads * 2 * pairs, cols)
    permuted = hf.reshape(heads, 2, pairs, cols).swapaxes(1, 2).reshape(hf.shape)
    np.testing.assert_array_equal(smollm2.unpermute_rope_rows(permuted, heads), hf)


@pytest.mark.slow
def test_logits_match_reference(session: ort.InferenceSession, shared_dir: Path) -> None:
    reference = np.load(shared_dir / "reference" / "smollm2_logits_window0_first16.npy")
    ids = _window0(shared_dir, 256)[None, :]
    (logits,) = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    np.testing.assert_allclose(logits[0, :16], reference, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_perplexity_matches_reference(smollm2_onnx: Path, shared_dir: Path) -> None:
    """The whole standard protocol (32 windows), through the evaluation harness."""
    expected = json.loads((shared_dir / "reference" / "smollm2_wikitext2_ppl.json").read_text())
    result = evaluation.evaluate_smollm2(smollm2_onnx, shared_dir)
    assert abs(result.metrics["perplexity"] - expected["perplexity"]) <= 0.05
    assert result.outputs.shape == (32,)
    assert result.file_bytes == smollm2_onnx.stat().st_size
    # The child holds the ~650 MB model; the caller's memory must not be counted in.
    assert 600e6 < result.peak_rss_bytes < 4e9
    assert result.eval_s > 0 and result.load_s > 0


@pytest.mark.slow
def test_kv_cache_matches_full_sequence_token_by_token(session: ort.InferenceSession,
                                                       smollm2_kv_onnx: Path,
                                                       shared_dir: Path) -> None:
    ids = _window0(shared_dir, 16)
    (full,) = session.run(["logits"], {"input_ids": ids[None, :],
                                       "attention_mask": np.ones((1, 16), np.int64)})
    cached = ort.InferenceSession(str(smollm2_kv_onnx), providers=["CPUExecutionProvider"])
    steps = decoding.decode_with_cache(cached, ids, prefill=4)
    np.testing.assert_allclose(steps, full[0], atol=1e-4, rtol=0)
    assert len(cached.get_inputs()) == 2 + 2 * 30 and len(cached.get_outputs()) == 1 + 2 * 30


@pytest.mark.slow
def test_graph_is_shaped_like_the_synthetic_llama(smollm2_onnx: Path) -> None:
    real = onnx.load(str(smollm2_onnx))
    fake = synthetic.llama(config=replace(synthetic.TINY_LLAMA, num_layers=30))
    assert patterns.op_sequence(real) == patterns.op_sequence(fake)
    g = patterns.Graph(real)
    assert patterns.rms_norms(g) == 61
    assert patterns.attention_blocks(g, scale_op="Mul") == 30
    assert patterns.silus(g) == 30
    assert patterns.linear_weights(g)["lm_head.weight"] == (576, 49152)
