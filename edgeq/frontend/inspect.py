"""What the compiler sees in a model: opsets, ops, parameters, interface, subgraphs, domains, and
what the front end recognised.

`summarize(graph)` describes the model as loaded (ops, parameters, inputs and outputs, dynamic
axes, custom-domain ops by name) and, on a copy brought through the front end (local functions
inlined, then FRONT_END: opset conversion, folding, canonicalization, shape rewrites), the
recognised blocks (edgeq.frontend.patterns, plus attention cores) and the attention-mask form of
each attention (key padding / causal / causal+padding from the canonical mask bias, none, or
unrecognised). A compiled model (one holding Q/DQ or integer kernels) was canonicalized when it
was compiled: it is read as it is, and lists the same blocks as its float model.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import onnx

from edgeq.errors import EdgeqError
from edgeq.frontend.functions import inline_functions
from edgeq.frontend.patterns import Role, Roles, find_roles
from edgeq.frontend.probing import dim_symbol
from edgeq.ir import Graph, Op, Value, clone_graph

# The front end every target's pipeline starts with, by pass name.
FRONT_END = ("convert-opset", "identity-elimination", "constant-folding", "canonicalize", "canonicalize-shapes",
             "dead-code-elimination", "shape-inference")
_COMPILED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "MatMulInteger", "QLinearMatMul", "ConvInteger",
                           "DynamicQuantizeLinear"})
MASK_FORMS = ("key-padding", "causal", "causal+padding", "none", "unrecognised")


def _dtype(elem_type: int | None) -> str:
    if not elem_type:
        return "unknown"
    return onnx.TensorProto.DataType.Name(elem_type).lower()


def _shape(value: Value) -> list[int | str | None] | None:
    shape = value.shape
    return None if shape is None else list(shape)


def is_compiled(graph: Graph) -> bool:
    """Whether the graph holds quantized ops (edgeq's output or another quantizer's)."""
    return any(op.op_type in _COMPILED_OPS or op.domain == "com.microsoft" and op.op_type in
               ("MatMulNBits", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul") for op in graph.ops())


def summarize(graph: Graph) -> dict[str, Any]:
    """A JSON-ready summary of the model."""
    ops = Counter()
    domains = Counter()
    custom = Counter()
    subgraph_count = 0
    nodes_total = 0

    def walk(g: Graph) -> None:
        nonlocal subgraph_count, nodes_total
        for op in g.topo_order():
            ops[op.kind] += 1
            nodes_total += 1
            if op.domain:
                domains[op.domain] += 1
                custom[op.kind] += 1
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
    front = front_end_view(graph)
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
        "dynamic_axes": dynamic_axes(graph),
        "subgraphs": subgraph_count,
        "custom_domains": dict(domains),
        "custom_ops": dict(sorted(custom.items())),
        "functions": [f"{f.domain}::{f.name}" for f in (info.functions if info else [])],
        **front,
    }


def dynamic_axes(graph: Graph) -> dict[str, dict[str, str]]:
    """{input: {axis: dim name}} for the dynamic dims of the graph inputs ('?' where unnamed)."""
    axes: dict[str, dict[str, str]] = {}
    for value in graph.inputs:
        if value.const is not None or value.shape is None:
            continue
        for axis in range(len(value.shape)):
            if dim_symbol(value, axis) is not None:
                dim = value.shape[axis]
                axes.setdefault(value.name, {})[str(axis)] = dim if isinstance(dim, str) and dim else "?"
    return axes


def front_end_view(graph: Graph) -> dict[str, Any]:
    """The model as the front end leaves it: blocks, mask forms, custom ops left, and how."""
    view = clone_graph(graph)
    error = None
    ran: list[str] = []
    try:
        inline_functions(view)
        if not is_compiled(view):
            ran = _run_front_end(view)
    except EdgeqError as err:  # report what was recognised on the graph as loaded
        error = err.problem
        view = clone_graph(graph)
    roles = find_roles(view)
    blocks = roles.counts()
    attention = attention_cores(view, roles)
    if attention:
        blocks["Attention"] = len(attention)
    masks = Counter(mask_form(view, softmax) for softmax in attention)
    return {
        "recognised_blocks": blocks,
        "mask": dict(sorted(masks.items())),
        "custom_ops_after_front_end": dict(sorted(Counter(op.kind for op in view.ops() if op.domain).items())),
        "front_end": {"passes": ran, "compiled_model": is_compiled(view), "error": error},
    }


def _run_front_end(graph: Graph) -> list[str]:
    from edgeq.pipeline import PassContext, PassManager
    from edgeq.registry import get_pass, passes

    known = passes()
    names = [name for name in FRONT_END if name in known]
    PassManager([get_pass(name)() for name in names], name="front-end")(graph, PassContext())
    return names


def attention_cores(graph: Graph, roles: Roles) -> list[Op]:
    """Softmax ops between two activation x activation matmuls (scores and context): one per
    attention core, whatever lies between (scale, mask, guards, Q/DQ)."""
    matmuls = {op for block in roles.blocks.get(Role.ATTENTION_MATMUL, ()) for op in block}
    cores = []
    for softmax in graph.ops_of_type("Softmax"):
        before = _near(graph, softmax, upstream=True)
        after = _near(graph, softmax, upstream=False)
        if before & matmuls and after & matmuls:
            cores.append(softmax)
    return cores


def _near(graph: Graph, op: Op, *, upstream: bool, depth: int = 6) -> set[Op]:
    """Ops within `depth` steps of `op` along its data inputs (upstream) or readers."""
    seen: set[Op] = set()
    frontier = [op]
    for _ in range(depth):
        nxt = []
        for current in frontier:
            if upstream:
                found = [graph.producer(v) for v in graph.inputs_of(current) if v is not None]
            else:
                found = [r for v in graph.outputs_of(current) if v is not None for r in graph.consumers(v)]
            nxt.extend(o for o in found if o is not None and o not in seen)
        seen.update(nxt)
        frontier = nxt
    return seen


def mask_form(graph: Graph, softmax: Op) -> str:
    """The mask an attention core applies: the canonical bias's kind (key-padding, causal,
    causal+padding), none (the scores reach the Softmax without an added bias) or unrecognised."""
    from edgeq.frontend.rules.mask import canonical_kind

    value = graph.inputs_of(softmax)[0]
    producer = graph.producer(value) if value is not None else None
    while producer is not None and producer.op_type in ("DequantizeLinear", "QuantizeLinear") and not producer.domain:
        producer = graph.producer(graph.inputs_of(producer)[0])
    if producer is None or producer.op_type not in ("Add", "Where") or producer.domain:
        return "none"
    if producer.op_type == "Add":
        kinds = [canonical_kind(graph, v) for v in graph.inputs_of(producer)]
        found = next((k for k in kinds if k is not None), None)
        if found is not None:
            return found
        bias = next((graph.constant(v) for v in graph.inputs_of(producer) if graph.is_const(v)), None)
        if bias is not None:
            return _constant_mask_form(bias.numpy())  # static shapes fold a causal bias to a constant
    return "unrecognised"


def _constant_mask_form(bias) -> str:
    """A constant additive bias: none (all zeros), causal (0 on and below the diagonal aligned to
    the last key, -1e4 or less above it), else unrecognised."""
    import numpy as np

    if bias.ndim < 2:
        return "none" if not np.any(bias) else "unrecognised"
    s, t = bias.shape[-2:]
    allowed = np.tril(np.ones((s, t), bool), k=t - s)
    rows = bias.reshape(-1, s, t)
    if not np.any(rows):
        return "none"
    if all(np.all(r[allowed] == 0) and np.all(r[~allowed] <= -1e4) for r in rows):
        return "causal"
    return "unrecognised"
