"""Numeric checks of matches: run a few ops of the graph on probe inputs in ONNX Runtime.

A pattern that could match something it does not mean (a GELU-shaped formula with other
constants, a norm over another axis) is checked by computing the matched ops on probe values
and comparing with the concept's definition.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from edgeq.ir import Graph, Op, Value
from edgeq.ir.to_proto import model_header


def sub_model(graph: Graph, ops: Iterable[Op], inputs: Iterable[Value], outputs: Iterable[Value]) -> onnx.ModelProto:
    """A model of `ops` (any order) reading `inputs` (typed as in the graph) and constants,
    writing `outputs`."""
    ops = _sorted(graph, ops)
    inputs = list(inputs)
    produced = {id(v) for op in ops for v in graph.outputs_of(op) if v is not None}
    fed = {id(v) for v in inputs}
    initializers: dict[str, onnx.TensorProto] = {}
    nodes = []
    for op in ops:
        for value in graph.inputs_of(op):
            if value is None or id(value) in produced or id(value) in fed or value.name in initializers:
                continue
            tensor = graph.constant(value)
            if tensor is None:
                raise ValueError(f"{value.name!r} is neither fed nor constant")
            initializers[value.name] = tensor.to_proto(value.name)
        node = helper.make_node(op.op_type, [v.name if v is not None else "" for v in graph.inputs_of(op)],
                                [v.name if v is not None else "" for v in graph.outputs_of(op)],
                                name=op.name, domain=op.domain or None)
        node.attribute.extend(op.attributes.values())
        nodes.append(node)
    model = model_header(graph)
    del model.metadata_props[:]
    model.ir_version = max(model.ir_version, 8)
    model.graph.CopyFrom(helper.make_graph(
        nodes, "probe", [_typed(v) for v in inputs],
        [_typed(v) if v.elem_type else helper.make_empty_tensor_value_info(v.name) for v in outputs],
        list(initializers.values())))
    return model


def _sorted(graph: Graph, ops: Iterable[Op]) -> list[Op]:
    """`ops` in a topological order of their own dependencies."""
    ops = sorted(set(ops), key=lambda op: op.order)
    members = set(ops)
    producer = {id(v): op for op in ops for v in graph.outputs_of(op) if v is not None}
    done: set[Op] = set()
    result: list[Op] = []
    for start in ops:
        stack = [(start, False)]
        while stack:
            op, expanded = stack.pop()
            if op in done:
                continue
            if expanded:
                done.add(op)
                result.append(op)
                continue
            stack.append((op, True))
            for value in graph.inputs_of(op):
                before = producer.get(id(value)) if value is not None else None
                if before is not None and before in members and before not in done:
                    stack.append((before, False))
    return result


def _typed(value: Value) -> onnx.ValueInfoProto:
    """The value's element type without its shape (probes come in other sizes)."""
    return helper.make_tensor_value_info(value.name, value.elem_type or onnx.TensorProto.FLOAT, None)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A one-thread CPU session that runs the graph as written (no graph optimizations)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_ops(graph: Graph, ops: Iterable[Op], feeds: Mapping[Value, np.ndarray], outputs: list[Value]
            ) -> list[np.ndarray] | None:
    """`outputs` of `ops` on `feeds`, or None when ONNX Runtime cannot run them."""
    inputs = list(feeds)
    try:
        sess = session(sub_model(graph, ops, inputs, outputs))
        return sess.run([v.name for v in outputs], {v.name: feeds[v] for v in inputs})
    except Exception:  # noqa: BLE001 (an op ORT cannot run here: the check fails, the rule refuses)
        return None


def block_function(graph: Graph, ops: Iterable[Op], x: Value, y: Value, probe: np.ndarray) -> np.ndarray | None:
    """y as a function of x through `ops` (every other input constant), on `probe`."""
    dtype = np.float16 if x.elem_type == onnx.TensorProto.FLOAT16 else np.float32
    result = run_ops(graph, ops, {x: probe.astype(dtype)}, [y])
    return None if result is None else np.asarray(result[0], np.float64)


def gelu_reference(x: np.ndarray, approximate: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def norm_probe(width: int, seed: int = 0) -> np.ndarray:
    """Rows of several scales and offsets, [2, 3, width]."""
    rng = np.random.default_rng(seed)
    scale = np.array([0.1, 1.0, 30.0])[None, :, None]
    return rng.normal(0.5, 1.0, size=(2, 3, width)) * scale + np.array([0.0, 3.0])[:, None, None]
