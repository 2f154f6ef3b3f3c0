"""The evaluation harness: data splits, metrics, and the measured child-process run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeq.models import evaluation
from edgeq.models import synthetic


def test_eval_windows_are_the_standard_protocol(shared_dir: Path) -> None:
    windows = evaluation.smollm2_eval_windows(shared_dir)
    ids = np.load(shared_dir / "reference" / "wikitext2_test_smollm2_ids.npy")
    assert windows.shape == (32, 256) and windows.dtype == np.int64
    np.testing.assert_array_equal(windows.reshape(-1), ids[:32 * 256])


def test_calibration_windows_start_at_1000(shared_dir: Path) -> None:
    feeds = evaluation.smollm2_calibration_feeds(shared_dir, count=2)
    ids = np.load(shared_dir / "reference" / "wikitext2_test_smollm2_ids.npy")
    np.testing.assert_array_equal(feeds[0]["input_ids"][0], ids[1000 * 256:1001 * 256])
    assert feeds[1]["input_ids"].shape == (1, 256) and feeds[1]["attention_mask"].all()
    with pytest.raises(evaluation.EvaluationError, match="overlap"):
        evaluation.smollm2_calibration_feeds(shared_dir, first=31)


def test_minilm_paragraph_splits_are_disjoint(shared_dir: Path) -> None:
    evaluated = evaluation.minilm_eval_paragraphs(shared_dir)
    calibration = evaluation.minilm_calibration_paragraphs(shared_dir, count=64)
    assert len(evaluated) == 256 and len(calibration) == 64
    assert not set(evaluated) & set(calibration)
    assert not any(p.startswith("=") for p in evaluated)


@pytest.mark.slow
def test_tokenization_matches_reference_inputs(shared_dir: Path) -> None:
    """The harness tokenizes as the reference did (MiniLM's tokenizer.json, length 128)."""
    sentences = (shared_dir / "reference" / "minilm_sentences.txt").read_text().splitlines()
    reference = np.load(shared_dir / "reference" / "minilm_inputs.npz")
    ours = evaluation.minilm_tokenize(sentences)
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(ours[name], reference[name])


def test_next_token_nll_and_perplexity() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, size=5)
    log_probs = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    expected = -np.mean([log_probs[t, ids[t + 1]] for t in range(4)])
    assert evaluation.next_token_nll(logits, ids) == pytest.approx(expected, rel=1e-9)
    assert evaluation.perplexity(np.array([1.0, 3.0])) == pytest.approx(np.exp(2.0))


def test_mean_pool_normalize_ignores_padding() -> None:
    hidden = np.array([[[3.0, 0.0], [3.0, 8.0], [100.0, 100.0]]], dtype=np.float32)
    pooled = evaluation.mean_pool_normalize(hidden, np.array([[1, 1, 0]]))
    np.testing.assert_allclose(pooled, [[0.6, 0.8]], rtol=1e-6)


def test_measure_runs_the_model_in_a_child(synthetic_llama: Path) -> None:
    windows = synthetic.llama_feeds(batch=3, seq=32)["input_ids"]
    run = evaluation.measure(synthetic_llama, "lm-nll", {"windows": windows})
    assert run.outputs.shape == (3,) and np.all(run.outputs > 0)
    # Interpreter + numpy + ONNX Runtime, not the caller's memory: tens to hundreds of MiB.
    assert 20 * 2**20 < run.peak_rss_bytes < 1024 * 2**20
    assert run.load_s > 0 and run.eval_s > 0


def test_measure_reports_a_broken_model(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(evaluation.EvaluationError, match="broken.onnx"):
        evaluation.measure(broken, "lm-nll", {"windows": np.zeros((1, 4), np.int64)})
    with pytest.raises(evaluation.EvaluationError, match="not found"):
        evaluation.measure(tmp_path / "missing.onnx", "lm-nll", {"windows": np.zeros((1, 4), np.int64)})


def test_file_bytes_count_external_data(tmp_path: Path) -> None:
    model = synthetic.bert()
    path = tmp_path / "bert.onnx"
    onnx.save(model, path, save_as_external_data=True, location="bert.onnx.data", size_threshold=0)
    total = path.stat().st_size + (tmp_path / "bert.onnx.data").stat().st_size
    assert evaluation.model_file_bytes(path) == total
