"""qnn-htp at batch > 1 on the HTP: the BERT fixture's position embeddings [1, S, H] broadcast over a
batch of 2 feed the embedding LayerNorm, a fused pattern the HTP computes wrongly (second row off by
up to 18,114 LSB: cosine 0.912 before tile-norm-input-constants); compiled at batch 2, every row of
the HTP's output matches the CPU run of the same QDQ model and float."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime_qnn")

import edgeq  # noqa: E402
from edgeq.options import CompileOptions  # noqa: E402
from edgeq.registry import get_target  # noqa: E402
from edgeq.runtime.providers import for_device  # noqa: E402
from edgeq.runtime.sessions import make_session  # noqa: E402

HTP = for_device(get_target("qnn-htp").executions[0], None)


def _batches(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        mask = np.ones((2, 32), np.int64)
        mask[1, 24:] = 0  # the second row padded, as a batch of two sentences is
        out.append({"input_ids": rng.integers(0, 1000, (2, 32)).astype(np.int64), "attention_mask": mask,
                    "token_type_ids": np.zeros((2, 32), np.int64)})
    return out


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64).reshape(a.shape[0], -1), b.astype(np.float64).reshape(b.shape[0], -1)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_a_batch_of_two_is_right_on_every_row(shared_dir, tmp_path):
    source = shared_dir / "fixtures/exports/bert_tiny_dynamo.onnx"
    result = edgeq.compile(source, "qnn-htp", CompileOptions(), calibration=_batches(8, seed=0))
    tiling = next(row for row in result.report.passes if row.name == "tile-norm-input-constants")
    assert tiling.stats["constants_tiled"] == 1  # the position embeddings
    path = result.save(tmp_path / "bert_b2.onnx")
    htp, cpu, reference = make_session(path, execution=HTP), make_session(path), make_session(source)
    for feed in _batches(2, seed=1):
        on_htp = htp.run(None, feed)[0]
        assert _row_cosines(cpu.run(None, feed)[0], on_htp).min() > 0.99999
        assert _row_cosines(reference.run(None, feed)[0], on_htp).min() > 0.9999
