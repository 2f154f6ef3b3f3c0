"""Test-side stand-in for the front end's mask rewrite (issue 11, canonical form 6): edgeq's Llama
builder writes its causal + padding mask as `Where(And(causal, padding), 0, float32.min)`; this
rewrites that subgraph into the canonical `Add(padding_bias, causal_bias)` with c = -10000, so the
fpga lowering can be tested on the synthetic Llama before the `canonicalize` pass exists."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MASK_BIAS = -10000.0


def canonical_causal_mask(model: onnx.ModelProto, *, ids: str = "input_ids",
                          mask: str = "attention_mask") -> onnx.ModelProto:
    """A copy of `model` with its Where(And(.., ..), 0, min) mask replaced by the canonical
    padding + causal bias (T = dim 1 of `mask`, S = dim 1 of `ids`)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    producers = {o: n for n in graph.node for o in n.output}
    index, where = next((i, n) for i, n in enumerate(graph.node) if n.op_type == "Where"
                        and n.input[0] in producers and producers[n.input[0]].op_type == "And")
    consts = {
        "cm_zero": np.array(0, np.int64), "cm_one": np.array(1, np.int64), "cm_axes0": np.array([0], np.int64),
        "cm_axes1": np.array([1], np.int64), "cm_axes01": np.array([0, 1], np.int64),
        "cm_axes12": np.array([1, 2], np.int64), "cm_onef": np.array(1.0, np.float32),
        "cm_c": np.array(MASK_BIAS, np.float32)}
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    n = helper.make_node
    nodes = [
        n("Shape", [mask], ["cm_mask_shape"]), n("Gather", ["cm_mask_shape", "cm_one"], ["cm_T"], axis=0),
        n("Shape", [ids], ["cm_ids_shape"]), n("Gather", ["cm_ids_shape", "cm_one"], ["cm_S"], axis=0),
        n("Range", ["cm_zero", "cm_T", "cm_one"], ["cm_keys"]),
        n("Sub", ["cm_T", "cm_S"], ["cm_past"]),
        n("Range", ["cm_past", "cm_T", "cm_one"], ["cm_queries"]),
        n("Unsqueeze", ["cm_keys", "cm_axes0"], ["cm_keys_row"]),
        n("Unsqueeze", ["cm_queries", "cm_axes1"], ["cm_queries_col"]),
        n("LessOrEqual", ["cm_keys_row", "cm_queries_col"], ["cm_allowed"]),
        n("Unsqueeze", ["cm_allowed", "cm_axes01"], ["cm_allowed4"]),
        n("Cast", ["cm_allowed4"], ["cm_allowed_f"], to=TensorProto.FLOAT),
        n("Sub", ["cm_onef", "cm_allowed_f"], ["cm_causal_blocked"]),
        n("Mul", ["cm_causal_blocked", "cm_c"], ["cm_causal_bias"]),
        n("Unsqueeze", [mask, "cm_axes12"], ["cm_mask4"]),
        n("Cast", ["cm_mask4"], ["cm_mask_f"], to=TensorProto.FLOAT),
        n("Sub", ["cm_onef", "cm_mask_f"], ["cm_padding_blocked"]),
        n("Mul", ["cm_padding_blocked", "cm_c"], ["cm_padding_bias"]),
        n("Add", ["cm_padding_bias", "cm_causal_bias"], [where.output[0]]),
    ]
    for i, node in enumerate(nodes):
        node.name = f"canonical_mask/{node.op_type}_{i}"
    del graph.node[index]
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    live = _live(graph)
    kept = [node for node in graph.node if any(o in live for o in node.output)]
    del graph.node[:]
    graph.node.extend(kept)
    onnx.checker.check_model(out)
    return out


def _live(graph: onnx.GraphProto) -> set[str]:
    """Values the graph outputs depend on."""
    producers = {o: node for node in graph.node for o in node.output}
    live, stack = set(), [o.name for o in graph.output]
    while stack:
        name = stack.pop()
        if name in live:
            continue
        live.add(name)
        node = producers.get(name)
        if node is not None:
            stack.extend(i for i in node.input if i)
    return live
