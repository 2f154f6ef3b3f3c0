"""The fusion check reads ONNX Runtime's optimised graph: fused QDQ groups show up as integer
kernels, a DequantizeLinear still feeding a float MatMul as unfused."""

from __future__ import annotations

from pathlib import Path

from edgeq.runtime.fusion import INTEGER_KERNELS, fusion_report
from tests.runtime.models import qdq_matmul, unfusable_dq_matmul


def test_a_fused_qdq_matmul_becomes_an_integer_kernel(tmp_path: Path):
    report = fusion_report(qdq_matmul(tmp_path / "fused.onnx"))
    assert report.integer_kernels == {"QLinearMatMul": 1}
    assert report.unfused == [] and report.all_fused


def test_an_unfused_dq_matmul_is_flagged(tmp_path: Path):
    report = fusion_report(unfusable_dq_matmul(tmp_path / "unfused.onnx"))
    assert report.unfused == ["mm"] and not report.all_fused
    assert report.integer_kernels == {} and report.dequantize_left == 1


def test_session_config_reaches_the_optimiser(tmp_path: Path):
    """Turning ORT's QDQ fusions off through the target's session config leaves the MatMul
    unfused: the config is what the check runs with."""
    report = fusion_report(qdq_matmul(tmp_path / "fused.onnx"), config=[("session.disable_quant_qdq", "1")])
    assert report.unfused == ["mm"] and not report.integer_kernels


def test_integer_kernels_name_only_quantized_ops():
    assert "MatMul" not in INTEGER_KERNELS and {"QLinearMatMul", "MatMulNBits", "MatMulInteger"} <= INTEGER_KERNELS
