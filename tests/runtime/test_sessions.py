"""The session factory: the options every edgeq session runs with, kept as they were (thread
counts and optimisation levels change ONNX Runtime's kernels and so the reported numbers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeq.runtime.sessions import make_session, session_options
from tests.runtime.models import affine


def test_default_options_leave_threads_to_onnxruntime():
    options = session_options()
    assert options.log_severity_level == 3
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (0, 0)
    assert options.optimized_model_filepath == ""


def test_threads_level_optimized_path_and_config():
    options = session_options(3, optimized_path="/tmp/x.onnx", config=[("session.disable_quant_qdq", "1")],
                              level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert options.optimized_model_filepath == "/tmp/x.onnx"
    assert options.get_session_config_entry("session.disable_quant_qdq") == "1"


def test_sessions_from_a_path_or_bytes_run_the_model(tmp_path: Path):
    path = affine(tmp_path / "m.onnx", 2.0, 1.0)
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    for model in (path, str(path), path.read_bytes()):
        session = make_session(model, threads=1)
        np.testing.assert_array_equal(session.run(None, {"x": x})[0], x * 2 + 1)
        assert session.get_providers() == ["CPUExecutionProvider"]


def test_optimized_path_writes_ort_s_graph(tmp_path: Path):
    make_session(affine(tmp_path / "m.onnx", 2.0), optimized_path=str(tmp_path / "opt.onnx"))
    assert (tmp_path / "opt.onnx").stat().st_size > 0
