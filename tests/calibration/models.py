"""Small ONNX models for calibration tests, built with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def mlp(hidden: int = 64, seed: int = 0) -> onnx.ModelProto:
    """x [batch, 32] -> MatMul (32 x hidden, fed as a graph input when calibrating) -> h -> Relu
    -> r -> MatMul (hidden x 4) -> Add bias -> y."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (32, hidden)).astype(np.float32)
    w2 = rng.normal(0, 0.5, (hidden, 4)).astype(np.float32)
    bias = np.arange(4, dtype=np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["m"]),
             helper.make_node("Add", ["m", "bias"], ["y"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(bias, "bias")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def mlp_reference(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """The mlp's tensors computed with numpy (float32), for comparisons."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    h = x @ weights["w1"]
    r = np.maximum(h, 0)
    m = r @ weights["w2"]
    return {"x": x, "h": h, "r": r, "m": m, "y": m + weights["bias"]}


def identity(shape: list[int | str] | None = None) -> onnx.ModelProto:
    """x -> Identity -> y, float32."""
    shape = shape if shape is not None else ["n"]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def tiny_lm(vocab: int = 100, width: int = 16, seq: int | str = "sequence",
            with_positions: bool = False) -> onnx.ModelProto:
    """input_ids, attention_mask [batch, seq] int64 -> Gather embedding -> masked -> MatMul -> logits."""
    rng = np.random.default_rng(1)
    embedding = rng.normal(0, 1, (vocab, width)).astype(np.float32)
    head = rng.normal(0, 1, (width, vocab)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"]),
             helper.make_node("Cast", ["attention_mask"], ["mask_float"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mask_float", "last_axis"], ["mask_3d"]),
             helper.make_node("Mul", ["embedded", "mask_3d"], ["masked"]),
             helper.make_node("MatMul", ["masked", "head"], ["logits"])]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", seq])]
    if with_positions:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", seq]))
        nodes.append(helper.make_node("Cast", ["position_ids"], ["positions_float"], to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes, "tiny_lm", inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", seq, vocab])],
        [numpy_helper.from_array(embedding, "embedding"), numpy_helper.from_array(head, "head"),
         numpy_helper.from_array(np.array([-1], np.int64), "last_axis")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
