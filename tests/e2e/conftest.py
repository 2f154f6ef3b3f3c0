"""Fixtures of the end-to-end tests: calibration data written as .npz from the synthetic feeds,
and a small float-input model for data errors that token ids cannot show (NaN)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.models import synthetic

SAMPLES = 8  # 6 calibrate, 2 are held out to verify the compiled model


@pytest.fixture(scope="session")
def bert_samples() -> list[dict[str, np.ndarray]]:
    return [synthetic.bert_feeds(batch=1, seq=16, seed=i) for i in range(SAMPLES)]


@pytest.fixture(scope="session")
def llama_samples() -> list[dict[str, np.ndarray]]:
    return [synthetic.llama_feeds(batch=1, seq=16, seed=i) for i in range(SAMPLES)]


@pytest.fixture(scope="session")
def bert_calib_dir(tmp_path_factory, bert_samples) -> Path:
    """A directory of .npz files, one sample each (the CLI's --calib DIR)."""
    directory = tmp_path_factory.mktemp("bert_calib")
    for i, feed in enumerate(bert_samples):
        np.savez(directory / f"sample_{i:02d}.npz", **feed)
    return directory


@pytest.fixture(scope="session")
def mlp_onnx(tmp_path_factory) -> Path:
    """x [batch, 16] float -> MatMul -> Relu -> MatMul -> y."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "w2")])
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path
