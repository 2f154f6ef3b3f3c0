"""The placement check per provider: ONNX Runtime's optimized graph on the CPU provider, the
runtime precision of OpenVINO's layers where the openvino extra is installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from edgeq.registry import get_target
from edgeq.runtime.placement import check_placement
from edgeq.runtime.providers import CPU
from edgeq.runtime.sessions import make_session
from tests.runtime.models import qdq_matmul, unfusable_dq_matmul

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="the openvino extra is not installed "
                                                             "(pip install 'edgeq[openvino]')")


def test_cpu_provider_flags_an_unfused_dq_matmul(tmp_path: Path):
    report = check_placement(unfusable_dq_matmul(tmp_path / "m.onnx"), CPU)
    assert report.unfused == ["mm"] and not report.all_fused and report.integer_kernels == {}
    assert report.provider == "CPUExecutionProvider" and report.check == "ort-optimized-graph"
    assert report.nodes_by_provider == {"CPUExecutionProvider": 3}


def test_cpu_provider_sees_the_integer_kernel(tmp_path: Path):
    report = check_placement(qdq_matmul(tmp_path / "m.onnx"), CPU)
    assert report.integer_kernels == {"QLinearMatMul": 1} and report.all_fused


@needs_openvino
def test_openvino_runs_and_lowers_a_qdq_matmul_to_int8(tmp_path: Path):
    openvino = get_target("x86-vnni").execution_named("openvino")
    path = qdq_matmul(tmp_path / "m.onnx")
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(make_session(path, 1, execution=openvino).run(None, {"x": x})[0],
                               make_session(path, 1).run(None, {"x": x})[0], atol=1e-6)
    report = check_placement(path, openvino, threads=1)
    assert report.provider == "OpenVINOExecutionProvider" and report.check == "openvino-runtime-precision"
    assert report.all_fused and any(k.startswith("FullyConnected") for k in report.integer_kernels)


@needs_openvino
def test_openvino_flags_a_matmul_left_in_float(tmp_path: Path):
    openvino = get_target("x86-vnni").execution_named("openvino")
    report = check_placement(unfusable_dq_matmul(tmp_path / "m.onnx"), openvino, threads=1)
    assert report.unfused == ["mm"] and report.float_layers == {"FullyConnected f32": 1}
