"""What the compiler sees in a model: opsets, ops, parameters, interface, subgraphs, domains."""

from __future__ import annotations

from collections import Counter
from typing import Any

import onnx

from edgeq.ir import Graph, Value


def _dtype(elem_type: int | None) -> str:
    if not elem_type:
        return "unknown"
    return onnx.TensorProto.DataType.Name(elem_type).lower()


def _shape(value: Value) -> list[int | str | None] | None:
    shape = value.shape
    return None if shape is None else list(shape)


def summarize(graph: Graph) -> dict[str, Any]:
    """A JSON-ready summary of the model."""
    ops = Counter()
    domains = Counter()
    subgraph_count = 0
    nodes_total = 0

    def walk(g: Graph) -> None:
        nonlocal subgraph_count, nodes_total
        for op in g.topo_order():
            ops[op.kind] += 1
            nodes_total += 1
            if op.domain:
                domains[op.domain] += 1
            for sub in op.subgraphs.values():
                for s in sub if isinstance(sub, list) else [sub]:
                    subgraph_count += 1
                    walk(s)

    walk(graph)
    params: dict[str, dict[str, int]] = {}
    for value in graph.initializers:
        entry = params.setdefault(_dtype(value.const.elem_type), {"tensors": 0, "elements": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["elements"] += value.const.size
        entry["bytes"] += value.const.nbytes
    info = graph.model
    from edgeq.frontend.patterns import find_roles

    return {
        "ir_version": info.ir_version if info else None,
        "producer": f"{info.producer_name} {info.producer_version}".strip() if info else "",
        "opsets": dict(sorted((info.opset_imports if info else {}).items())),
        "nodes": nodes_total,
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "parameters": params,
        "parameters_total": sum(p["elements"] for p in params.values()),
        "parameter_bytes_total": sum(p["bytes"] for p in params.values()),
        "inputs": [{"name": v.name, "dtype": _dtype(v.elem_type), "shape": _shape(v)} for v in graph.inputs
                   if v.const is None],
        "outputs": [{"name": v.name, "dtype": _dtype(v.elem_type), "shape": _shape(v)} for v in graph.outputs],
        "subgraphs": subgraph_count,
        "custom_domains": dict(domains),
        "functions": [f"{f.domain}::{f.name}" for f in (info.functions if info else [])],
        "recognised_blocks": find_roles(graph).counts(),
    }
