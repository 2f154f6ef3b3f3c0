"""Tiny ONNX models for the runtime tests, written to files (sessions are opened from paths)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper, numpy_helper


def write_model(graph: onnx.GraphProto, path: Path, opset: int = 17) -> Path:
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


def affine(path: Path, scale: float, shift: float = 0.0) -> Path:
    """y = x * scale + shift, x float [1, 4]."""
    consts = [numpy_helper.from_array(np.array(scale, np.float32), "scale"),
              numpy_helper.from_array(np.array(shift, np.float32), "shift")]
    nodes = [helper.make_node("Mul", ["x", "scale"], ["scaled"]), helper.make_node("Add", ["scaled", "shift"], ["y"])]
    graph = helper.make_graph(nodes, "affine", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1, 4])], consts)
    return write_model(graph, path)


def _matmul_model(path: Path, nodes: list[onnx.NodeProto], weight: onnx.TensorProto) -> Path:
    consts = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
              numpy_helper.from_array(np.array(0, np.int8), "z"), weight]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", T.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [2, 4])], consts)
    return write_model(graph, path)


def qdq_matmul(path: Path) -> Path:
    """DQ(Q(x)) @ DQ(w_q) -> Q -> DQ: a QDQ group ONNX Runtime fuses into QLinearMatMul."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"], name="q_x"),
             helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["x_dq"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w_q", "s", "z"], ["w"], name="dq_w"),
             helper.make_node("MatMul", ["x_dq", "w"], ["m"], name="mm"),
             helper.make_node("QuantizeLinear", ["m", "s", "z"], ["m_q"], name="q_m"),
             helper.make_node("DequantizeLinear", ["m_q", "s", "z"], ["y"], name="dq_m")]
    weight = numpy_helper.from_array(np.arange(-8, 8, dtype=np.int8).reshape(4, 4), "w_q")
    return _matmul_model(path, nodes, weight)


def unfusable_dq_matmul(path: Path) -> Path:
    """DQ(Q(x)) @ w with a float weight: a DequantizeLinear feeding a MatMul that no integer
    kernel can take (ONNX Runtime leaves it a float MatMul)."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"], name="q_x"),
             helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["x_dq"], name="dq_x"),
             helper.make_node("MatMul", ["x_dq", "w"], ["y"], name="mm")]
    return _matmul_model(path, nodes, numpy_helper.from_array(np.ones((4, 4), np.float32), "w"))
