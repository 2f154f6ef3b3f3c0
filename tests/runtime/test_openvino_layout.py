"""The x86 targets' QDQ layout for OpenVINO, which is target data (the execution's op rules and
activation placement): every activation x activation MatMul reads an adjacent Q -> DQ pair (at
the producer; the head Reshape/Transpose run on the dequantized float), without a zero point:
s8 symmetric, or u8 with zero point 0 for the non-negative softmax probabilities. Run here on
ONNX Runtime's CPU provider (same graph)."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
from onnx import numpy_helper

import edgeq
from edgeq.options import CompileOptions
from edgeq.registry import get_target
from edgeq.runtime.execution import ActivationPlacement


@pytest.fixture(scope="module")
def compiled(synthetic_bert, bert_samples):
    x86 = get_target("x86-vnni")
    openvino = x86.execution_named("openvino")
    # The OpenVINO layout, run on the CPU provider so the test needs no plugin.
    layout_on_cpu = dataclasses.replace(openvino, name="openvino-layout", provider="CPUExecutionProvider",
                                        plugin=None, device_config=None,
                                        session_config=(("session.disable_quant_qdq", "1"),),
                                        placement_check="ort-optimized-graph")
    target = dataclasses.replace(x86, executions=(layout_on_cpu,))
    return edgeq.compile(synthetic_bert, target, CompileOptions(), calibration=bert_samples)


def _proto(compiled):
    from edgeq.ir import graph_to_proto

    return graph_to_proto(compiled.graph)


def test_attention_matmuls_read_adjacent_qdq_without_zero_points(compiled):
    graph = _proto(compiled)
    producers = {o: n for n in graph.node for o in n.output}
    weights = {t.name: t for t in graph.initializer}
    checked = 0
    for node in graph.node:
        if node.op_type != "MatMul" or any(i in weights for i in node.input):
            continue
        dtypes = []
        for value in node.input:
            dq = producers[value]
            while dq.op_type in ("Reshape", "Transpose"):  # movement runs on the dequantized float
                dq = producers[dq.input[0]]
            assert dq.op_type == "DequantizeLinear", node.name
            q = producers[dq.input[0]]
            assert q.op_type == "QuantizeLinear", f"{node.name}: data movement between Q and DQ"
            zero = numpy_helper.to_array(weights[dq.input[2]])
            assert not zero.any(), f"{node.name}: zero point {zero}"
            dtypes.append(zero.dtype.name)
        assert dtypes[1] == "int8"
        checked += 1
    assert checked == 4  # 2 layers x (scores, context)
    probs = [n for n in graph.node if n.op_type == "QuantizeLinear" and producers[n.input[0]].op_type == "Softmax"]
    assert probs and all(numpy_helper.to_array(weights[q.input[2]]).dtype == np.uint8 for q in probs)


def test_the_layout_is_accurate_and_reported(compiled):
    report = compiled.report
    assert report.provider == "openvino-layout"
    assert report.verification.outputs[0].cosine_mean > 0.99
    assert compiled.target.execution.activation_placement == ActivationPlacement.SOURCE_QDQ


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                    reason="the openvino extra is not installed (pip install 'edgeq[openvino]')")
def test_compiled_for_openvino_every_quantized_op_runs_int8_there(synthetic_bert, bert_samples):
    compiled = edgeq.compile(synthetic_bert, "x86-vnni", CompileOptions(threads=1), calibration=bert_samples,
                             provider="openvino")
    report = compiled.report
    assert report.provider == "openvino" and report.fusion.provider == "OpenVINOExecutionProvider"
    assert report.fusion.all_fused, report.fusion.unfused
    assert report.verification.outputs[0].cosine_mean > 0.99
    assert any(k.startswith("Subgraph") for k in report.fusion.integer_kernels)  # the int8 MHA kernel
