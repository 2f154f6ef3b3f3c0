"""Patterns the HTP computed wrongly, compiled for qnn-htp and run on the HTP against the CPU run of
the same QDQ model: a batch of 2 whose position embeddings [1, S, H] broadcast into the embedding
LayerNorm (second row off by up to 18,114 LSB, cosine 0.912, before tile-norm-input-constants),
Conv output channels with dead weights, and a ConvTranspose's bias Add."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

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


def _conv_model(head: str) -> onnx.ModelProto:
    """x [1, 8, 8, 8] -> Conv or ConvTranspose (8 -> 8 channels) with a bias -> Relu. The Conv's
    weights have three dead output channels (1e-30 .. 1e-9 of the others, as PP-OCRv4 det's SE
    convs hold) whose outputs are their biases; the ConvTranspose's bias is an Add after it, as
    exporters write it."""
    rng = np.random.default_rng(0)
    bias = rng.uniform(-2, 2, 8).astype(np.float32)
    if head == "Conv":
        weight = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
        weight[[1, 4, 6]] *= np.array([1e-30, 1e-9, 1e-12], np.float32)[:, None, None, None]
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])]
        inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
    else:
        weight = rng.standard_normal((8, 8, 2, 2)).astype(np.float32)
        nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["t"], strides=[2, 2]),
                 helper.make_node("Add", ["t", "b"], ["y"])]
        inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias.reshape(1, 8, 1, 1), "b")]
    nodes.append(helper.make_node("Relu", ["y"], ["out"]))
    side = 8 if head == "Conv" else 16
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, side, side])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("head", ["Conv", "ConvTranspose"])
def test_conv_biases_the_htp_used_to_get_wrong_are_right(head, tmp_path):
    """A Conv with dead channels (their weight scales floored: the HTP output 0 for them) and a
    ConvTranspose's bias Add (kept apart: the HTP's fused ConvTranspose bias is wrong) give on
    the HTP what the CPU gives for the same QDQ model, channel by channel."""
    source = tmp_path / f"{head}.onnx"
    onnx.save(_conv_model(head), str(source))
    rng = np.random.default_rng(1)
    samples = [{"x": rng.standard_normal((1, 8, 8, 8)).astype(np.float32)} for _ in range(6)]
    path = edgeq.compile(source, "qnn-htp", CompileOptions(), calibration=samples).save(tmp_path / "q.onnx")
    htp, cpu, reference = make_session(path, execution=HTP), make_session(path), make_session(source)
    for feed in samples[:2]:
        want, got = cpu.run(None, feed)[0], htp.run(None, feed)[0]
        step = float(np.abs(reference.run(None, feed)[0]).max()) / 65535
        assert np.abs(got - want).reshape(8, -1).max(axis=1).max() < 8 * step
