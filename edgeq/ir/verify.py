"""The invariants of the edgeq IR, checked after every pass in tests (edgeq.load itself checks
the structural ones it needs: one producer, no dangling input, no cycle).

`verify(graph)` raises `GraphError` (naming the first broken invariant and how many more
there are) unless every one of these holds, in the graph and in every nested graph:

1. Registry. The networkx graph holds only `Op` and `Value` nodes; every value node is
   registered under its name, every registered value is a node; graph inputs, outputs and
   initializers are registered values, listed once each; initializers carry a constant.
2. Bipartite edges. Value -> op edges are keyed ("in", slot) or ("implicit", name); op -> value
   edges are keyed ("out", slot); there is no other edge.
3. One producer per value. At most one op writes a value, and none writes a constant, a graph
   input, a sparse initializer or a value captured from an enclosing graph.
4. Slots. An op has at most one value per input or output slot, every slot lies inside the
   op's slot count, and a slot left empty (an omitted input or output) is one that the op's
   schema marks optional (ops without a schema, e.g. custom domains or local functions, may
   leave any slot empty). The input count respects the schema's bounds.
5. Every input is defined. Each value an op reads (explicitly or from a subgraph) is a
   constant, a graph input, a sparse initializer, the output of an op of the same graph, or —
   in a nested graph only — a name the enclosing graphs define.
6. Graph outputs exist: each is a registered value defined as in 5.
7. Acyclic, captures included (an op comes after every value its subgraphs read).
8. Captures match. An op's implicit inputs are exactly the outer names its subgraphs read.
9. Legal weights. Every initializer has a legal element type and non-negative dims, and its
   stored data has the size (raw bytes, typed-field count, or array shape/dtype) its type and
   dims require. Declared tensor types of values name a legal element type (or none).
10. Attributes are keyed by their own name; graph attributes are nested `Graph`s.

`check_with_onnx(graph)` is the outside opinion: onnx's checker (full check: strict shape
inference) and an ONNX Runtime session load, in memory for small models and through a
temporary external-data file for large ones (over 2 GB included).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
import onnxruntime as ort
from onnx.defs import OpSchema

from edgeq.errors import GraphError
from edgeq.ir.graph import Graph, Op, Value
from edgeq.ir.tensor import (
    LEGAL_ELEM_TYPES,
    PACKED_TYPES,
    Tensor,
    elem_type_name,
    np_dtype,
    storage_nbytes,
)
from edgeq.ir.to_proto import to_model_proto
from edgeq.ir.writer import save
from edgeq.runtime.sessions import make_session

# Models whose weights exceed this are checked from a temporary file with external data
# instead of an in-memory copy of the whole model.
IN_MEMORY_LIMIT = 256 << 20


def verify(graph: Graph) -> None:
    """Raise GraphError unless `graph` (and every nested graph) satisfies the IR invariants."""
    problems = find_problems(graph)
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise GraphError(problems[0] + more)


def find_problems(graph: Graph) -> list[str]:
    """Every broken invariant of `graph`, one line each (empty when the graph is sound)."""
    problems: list[str] = []
    opsets = dict(graph.model.opset_imports) if graph.model is not None else {}
    functions = {(f.domain, f.name) for f in graph.model.functions} if graph.model is not None else set()
    _check_graph(graph, None, opsets, functions, f"graph {graph.name!r}", problems)
    return problems


# ---- one graph -------------------------------------------------------------------------------


def _check_graph(g: Graph, outer: frozenset[str] | None, opsets: dict[str, int], functions: set,
                 where: str, problems: list[str]) -> None:
    nxg = g._g
    values = g._values
    sparse_names = {s.values.name for s in g.sparse_initializers}
    input_ids = {id(v) for v in g.inputs}

    # 1. registry
    for node in nxg.nodes:
        if isinstance(node, Value):
            if values.get(node.name) is not node:
                problems.append(f"{where}: value {node.name!r} is in the graph but not registered under its name")
        elif not isinstance(node, Op):
            problems.append(f"{where}: node {node!r} is neither an Op nor a Value")
    for name, value in values.items():
        if value.name != name:
            problems.append(f"{where}: value registered as {name!r} is named {value.name!r}")
        if value not in nxg:
            problems.append(f"{where}: value {name!r} is registered but not in the graph")
    for label, listed in (("graph input", g.inputs), ("graph output", g.outputs), ("initializer", g.initializers)):
        seen: set[int] = set()
        for value in listed:
            if values.get(value.name) is not value:
                problems.append(f"{where}: {label} {value.name!r} is not a value of the graph")
            if id(value) in seen and label != "graph output":
                problems.append(f"{where}: {label} {value.name!r} is listed twice")
            seen.add(id(value))
    for value in g.initializers:
        if value.const is None:
            problems.append(f"{where}: initializer {value.name!r} has no constant data")

    # 2. bipartite, well-keyed edges
    for src, dst, key in nxg.edges(keys=True):
        ok = (isinstance(src, Value) and isinstance(dst, Op) and isinstance(key, tuple) and len(key) == 2
              and ((key[0] == "in" and isinstance(key[1], int) and key[1] >= 0)
                   or (key[0] == "implicit" and isinstance(key[1], str))))
        ok = ok or (isinstance(src, Op) and isinstance(dst, Value) and isinstance(key, tuple) and len(key) == 2
                    and key[0] == "out" and isinstance(key[1], int) and key[1] >= 0)
        if not ok:
            problems.append(f"{where}: malformed edge {_name(src)} -> {_name(dst)} keyed {key!r}")

    # 3. one producer per value
    def defined(value: Value) -> bool:
        return (value.const is not None or id(value) in input_ids or value.name in sparse_names
                or any(isinstance(p, Op) for p in nxg.predecessors(value))
                or (value.outer and outer is not None and value.name in outer))

    for value in values.values():
        if value not in nxg:
            continue
        producers = [src for src, _, key in nxg.in_edges(value, keys=True) if isinstance(src, Op)]
        if len(producers) > 1:
            names = ", ".join(_name(p) for p in producers)
            problems.append(f"{where}: value {value.name!r} has {len(producers)} producers ({names})")
        if producers:
            for kind, flag in (("an initializer", value.const is not None), ("a graph input", id(value) in input_ids),
                               ("a sparse initializer", value.name in sparse_names),
                               ("captured from an enclosing graph", value.outer)):
                if flag:
                    problems.append(f"{where}: value {value.name!r} is {kind} but op {_name(producers[0])} writes it")
        if value.outer and outer is None:
            problems.append(f"{where}: the top-level graph marks {value.name!r} as captured from an enclosing graph")
        elif value.outer and value.name not in outer:
            problems.append(f"{where}: {value.name!r} is read from an enclosing graph that does not define it")

    # 4. slots, 5. inputs defined, 8. captures, 10. attributes
    for op in [n for n in nxg.nodes if isinstance(n, Op)]:
        _check_op(g, op, opsets, functions, where, defined, problems)

    # 6. graph outputs exist
    for value in g.outputs:
        if values.get(value.name) is value and not defined(value):
            problems.append(f"{where}: graph output {value.name!r} is produced by nothing")

    # 7. acyclic
    if not nx.is_directed_acyclic_graph(nxg):
        cycle = nx.find_cycle(nxg)
        ops = [_name(u) for u, *_ in cycle if isinstance(u, Op)]
        problems.append(f"{where}: cycle through ops {ops}")

    # 9. legal weights and declared types
    for value in g.initializers:
        if value.const is not None:
            problem = tensor_problem(value.const)
            if problem:
                problems.append(f"{where}: initializer {value.name!r} {problem}")
    for value in values.values():
        if value.type is not None and value.type.HasField("tensor_type"):
            elem = value.type.tensor_type.elem_type
            if elem and elem not in LEGAL_ELEM_TYPES:
                problems.append(f"{where}: value {value.name!r} declares an illegal element type {elem}")

    # nested graphs see every name this graph defines
    scope = frozenset(v.name for v in values.values() if v in nxg and defined(v)) | (outer or frozenset())
    for op in g.topo_order() if nx.is_directed_acyclic_graph(nxg) else [n for n in nxg.nodes if isinstance(n, Op)]:
        for attr, sub in op.subgraphs.items():
            for i, body in enumerate(sub if isinstance(sub, list) else [sub]):
                if not isinstance(body, Graph):
                    problems.append(f"{where}: op {_name(op)} attribute {attr!r} is not a Graph")
                    continue
                label = f"{attr}[{i}]" if isinstance(sub, list) else attr
                _check_graph(body, scope, opsets, functions, f"{where} > op {_name(op)}.{label}", problems)


def _check_op(g: Graph, op: Op, opsets: dict[str, int], functions: set, where: str, defined, problems: list[str]) -> None:
    nxg = g._g
    data = nxg.nodes[op]
    n_in = data.get("n_in", 0)
    in_slots: dict[int, Value] = {}
    implicit: set[str] = set()
    for value, _, key in nxg.in_edges(op, keys=True):
        if key[0] == "in":
            if key[1] in in_slots:
                problems.append(f"{where}: op {_name(op)} has two values in input slot {key[1]}")
            if key[1] >= n_in:
                problems.append(f"{where}: op {_name(op)} reads {value.name!r} at input slot {key[1]}, "
                                f"past its {n_in} input slots")
            in_slots[key[1]] = value
        elif key[0] == "implicit":
            implicit.add(value.name)
        if isinstance(value, Value) and not defined(value):
            problems.append(f"{where}: op {_name(op)} reads {value.name!r}, which nothing defines (dangling input)")
    out_slots: dict[int, Value] = {}
    for _, value, key in nxg.out_edges(op, keys=True):
        if key[0] == "out":
            if key[1] in out_slots:
                problems.append(f"{where}: op {_name(op)} has two values in output slot {key[1]}")
            out_slots[key[1]] = value
    n_out = max(data.get("n_out", 0), max(out_slots, default=-1) + 1)

    schema = _schema(op, opsets, functions)
    if schema is not None:
        if n_in > schema.max_input:
            problems.append(f"{where}: op {_name(op)} has {n_in} inputs; {op.op_type} takes at most {schema.max_input}")
        for slot in range(n_in):
            if slot not in in_slots and not _optional(schema.inputs, slot):
                problems.append(f"{where}: op {_name(op)} leaves required input slot {slot} "
                                f"({_param_name(schema.inputs, slot)}) empty")
        if n_in < schema.min_input:
            problems.append(f"{where}: op {_name(op)} has {n_in} inputs; {op.op_type} needs at least {schema.min_input}")
        for slot in range(n_out):
            if slot not in out_slots and not _optional(schema.outputs, slot):
                problems.append(f"{where}: op {_name(op)} leaves required output slot {slot} "
                                f"({_param_name(schema.outputs, slot)}) empty")
        if n_out > schema.max_output:
            problems.append(f"{where}: op {_name(op)} has {n_out} outputs; {op.op_type} has at most {schema.max_output}")

    captured: set[str] = set()
    for sub in op.subgraphs.values():
        for body in sub if isinstance(sub, list) else [sub]:
            if isinstance(body, Graph):
                captured |= {v.name for v in body._values.values() if v.outer}
    if captured != implicit:
        missing, extra = sorted(captured - implicit), sorted(implicit - captured)
        detail = "; ".join(x for x in (f"not linked: {missing}" if missing else "",
                                       f"linked but unread: {extra}" if extra else "") if x)
        problems.append(f"{where}: op {_name(op)}'s implicit inputs differ from what its subgraphs read ({detail})")
    for name, attr in op.attributes.items():
        if not isinstance(attr, onnx.AttributeProto) or attr.name != name:
            problems.append(f"{where}: op {_name(op)} attribute {name!r} is not an AttributeProto of that name")
        elif attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            problems.append(f"{where}: op {_name(op)} keeps graph attribute {name!r} as a proto, not a Graph")
    both = set(op.attributes) & set(op.subgraphs)
    if both:
        problems.append(f"{where}: op {_name(op)} has {sorted(both)} both as attribute and subgraph")


def _schema(op: Op, opsets: dict[str, int], functions: set) -> OpSchema | None:
    domain = op.domain or ""
    if (domain, op.op_type) in functions:
        return None
    version = opsets.get(domain, opsets.get("ai.onnx") if domain == "" else None)
    if version is None:
        version = onnx.defs.onnx_opset_version() if domain == "" else None
    if version is None:
        return None
    return _lookup_schema(op.op_type, domain, version)


@functools.lru_cache(maxsize=4096)
def _lookup_schema(op_type: str, domain: str, version: int) -> OpSchema | None:
    try:
        return onnx.defs.get_schema(op_type, version, domain)
    except onnx.defs.SchemaError:
        return None


def _formal(params, slot: int):
    if slot < len(params):
        return params[slot]
    if params and params[-1].option == OpSchema.FormalParameterOption.Variadic:
        return params[-1]
    return None


def _optional(params, slot: int) -> bool:
    param = _formal(params, slot)
    return param is not None and param.option == OpSchema.FormalParameterOption.Optional


def _param_name(params, slot: int) -> str:
    param = _formal(params, slot)
    return param.name if param is not None else "?"


def _name(node) -> str:
    if isinstance(node, Op):
        return repr(node.name) if node.name else f"<{node.op_type}>"
    if isinstance(node, Value):
        return repr(node.name)
    return repr(node)


# ---- weights -------------------------------------------------------------------------------


def tensor_problem(tensor: Tensor) -> str | None:
    """Why a constant tensor is not a legal ONNX weight (None when it is)."""
    if not isinstance(tensor, Tensor):
        return f"holds a {type(tensor).__name__}, not a Tensor"
    if tensor.elem_type not in LEGAL_ELEM_TYPES:
        return f"has an illegal element type ({elem_type_name(tensor.elem_type)})"
    if any(d < 0 for d in tensor.dims):
        return f"has a negative dimension in {list(tensor.dims)}"
    size = int(np.prod(tensor.dims, dtype=np.int64))
    expected = storage_nbytes(tensor.elem_type, tensor.dims)
    if tensor._array is not None:
        array = tensor._array
        want = np.dtype(object) if tensor.elem_type == onnx.TensorProto.STRING else np_dtype(tensor.elem_type)
        if array.dtype != want or tuple(array.shape) != tensor.dims:
            return (f"holds a {array.dtype} array of shape {list(array.shape)} for "
                    f"{elem_type_name(tensor.elem_type)} {list(tensor.dims)}")
        return None
    if tensor._raw is not None:
        if expected is None or len(tensor._raw) != expected:
            return f"holds {len(tensor._raw)} bytes; {elem_type_name(tensor.elem_type)} {list(tensor.dims)} needs {expected}"
        return None
    proto = tensor._proto
    if proto is None:
        return None if tensor._loader is not None else "has no data"
    if proto.data_type != tensor.elem_type or tuple(proto.dims) != tensor.dims:
        return "disagrees with its stored proto on type or shape"
    if proto.HasField("raw_data"):
        if expected is None or len(proto.raw_data) != expected:
            return f"holds {len(proto.raw_data)} raw bytes; {elem_type_name(tensor.elem_type)} {list(tensor.dims)} needs {expected}"
        return None
    field = onnx.helper.tensor_dtype_to_field(tensor.elem_type)
    count = len(getattr(proto, field))
    want = _typed_count(tensor.elem_type, size)
    if count != want:
        return f"holds {count} values in {field}; {elem_type_name(tensor.elem_type)} {list(tensor.dims)} needs {want}"
    return None


def _typed_count(elem_type: int, size: int) -> int:
    """Entries a typed proto field holds for `size` elements."""
    if elem_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        return 2 * size  # real and imaginary parts
    if elem_type in PACKED_TYPES:
        return storage_nbytes(elem_type, (size,))  # int32_data holds one packed byte per entry
    return size


# ---- the outside opinion ---------------------------------------------------------------------


def check_with_onnx(graph: Graph, *, full_check: bool = True, runtime: bool = True) -> None:
    """Run onnx's checker (strict shape inference when `full_check`) and, if `runtime`, load the
    model in an ONNX Runtime session; raise GraphError with the first line of what they say.

    Small models are checked in memory; models whose weights exceed IN_MEMORY_LIMIT (and any
    over protobuf's 2 GB limit) are written once to a temporary folder with external data and
    checked from the file, so the weights are never copied into a proto.
    """
    weights = sum(v.const.nbytes for v in graph.initializers if v.const is not None)
    if weights <= IN_MEMORY_LIMIT:
        data = to_model_proto(graph).SerializeToString()
        _run_checks(onnx.load_from_string(data), data, full_check, runtime)
        return
    with tempfile.TemporaryDirectory(prefix="edgeq-check-") as tmp:
        path = save(graph, Path(tmp) / "model.onnx", external_data=True)
        _run_checks(str(path), str(path), full_check, runtime)


def _run_checks(model: onnx.ModelProto | str, source: bytes | str, full_check: bool, runtime: bool) -> None:
    try:
        onnx.checker.check_model(model, full_check=full_check)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise GraphError(f"onnx.checker rejects the model: {_first_line(err)}") from None
    if runtime:
        try:
            make_session(source, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        except Exception as err:  # noqa: BLE001 (ORT's pybind errors share no base class)
            raise GraphError(f"onnxruntime cannot load the model: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
