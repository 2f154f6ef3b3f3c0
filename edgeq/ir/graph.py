"""The edgeq IR: one bipartite networkx MultiDiGraph of op nodes and value nodes.

Edges run value -> op (key ("in", slot)) and op -> value (key ("out", slot)), so `Mul(x, x)`
is two parallel edges. Values used by a subgraph of an op (If/Loop/Scan bodies reading outer
names) are linked by ("implicit", name) edges so that liveness and ordering see them.
Passes use the accessors here and never the networkx dicts.

Conversion to and from ONNX protos lives beside it: `edgeq.ir.to_proto` (`to_model_proto`,
`graph_to_proto`) and `edgeq.ir.from_proto` (`graph_from_proto`, `clone_graph`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import networkx as nx
import numpy as np
import onnx
from onnx import helper

from edgeq.errors import GraphError
from edgeq.ir.tensor import Tensor


class Value:
    """A named tensor of the graph: an op's output, a graph input, or a constant (weight)."""

    __slots__ = ("name", "type", "const", "doc_string", "outer", "metadata_props", "__weakref__")

    def __init__(self, name: str, type: onnx.TypeProto | None = None, const: Tensor | None = None,
                 doc_string: str = "", outer: bool = False, metadata_props: tuple = ()):
        self.name = name
        self.type = type              # TypeProto (dtype + shape) when known
        self.const = const            # weight data for initializers
        self.doc_string = doc_string
        self.outer = outer            # defined in an enclosing graph (subgraph capture)
        self.metadata_props = metadata_props  # ValueInfoProto.metadata_props, (key, value) pairs

    @property
    def elem_type(self) -> int | None:
        if self.const is not None:
            return self.const.elem_type
        if self.type is not None and self.type.HasField("tensor_type"):
            return self.type.tensor_type.elem_type or None
        return None

    @property
    def shape(self) -> tuple[int | str | None, ...] | None:
        """Dims as ints (static), strings (symbolic) or None (unknown); None if rank unknown."""
        if self.const is not None:
            return self.const.dims
        if self.type is None or not self.type.HasField("tensor_type") or not self.type.tensor_type.HasField("shape"):
            return None
        dims: list[int | str | None] = []
        for d in self.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        return tuple(dims)

    def set_type(self, elem_type: int, shape: Iterable[int | str | None] | None) -> None:
        self.type = helper.make_tensor_type_proto(elem_type, None if shape is None else list(shape))

    def __repr__(self) -> str:
        return f"Value({self.name!r})"


class Op:
    """One ONNX node. Attributes stay AttributeProtos (exact round-trip); graph attributes
    become nested `Graph`s owned by this op (`subgraphs`)."""

    __slots__ = ("op_type", "domain", "name", "attributes", "subgraphs", "doc_string", "overload",
                 "metadata_props", "order", "__weakref__")

    def __init__(self, op_type: str, domain: str = "", name: str = "", *,
                 attributes: dict[str, onnx.AttributeProto] | None = None,
                 subgraphs: dict[str, Graph | list[Graph]] | None = None,
                 doc_string: str = "", overload: str = "", metadata_props: tuple = ()):
        self.op_type = op_type
        self.domain = "" if domain == "ai.onnx" else domain
        self.name = name
        self.attributes = dict(attributes or {})
        self.subgraphs = dict(subgraphs or {})
        self.doc_string = doc_string
        self.overload = overload
        self.metadata_props = metadata_props
        self.order = 0.0  # position in the original node list; keeps saves stable

    def attr(self, name: str, default: Any = None) -> Any:
        proto = self.attributes.get(name)
        return default if proto is None else helper.get_attribute_value(proto)

    def set_attr(self, name: str, value: Any) -> None:
        self.attributes[name] = helper.make_attribute(name, value)

    @property
    def kind(self) -> str:
        """Registry key of the op kind: 'MatMul', or 'domain::Op' outside the default domain."""
        return self.op_type if not self.domain else f"{self.domain}::{self.op_type}"

    def __repr__(self) -> str:
        return f"Op({self.op_type}, {self.name!r})"


@dataclass
class ModelInfo:
    """What a ModelProto carries besides its graph; preserved for exact round-trip."""

    ir_version: int = onnx.IR_VERSION
    opset_imports: dict[str, int] = field(default_factory=lambda: {"": 21})
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    metadata_props: list[tuple[str, str]] = field(default_factory=list)
    functions: list[onnx.FunctionProto] = field(default_factory=list)
    training_info: list[onnx.TrainingInfoProto] = field(default_factory=list)
    opset_order: list[str] = field(default_factory=list)
    configuration: list = field(default_factory=list)  # ModelProto.configuration (DeviceConfigurationProto)


class Graph:
    """A (sub)graph. The top-level graph also carries `model` (ModelInfo)."""

    def __init__(self, name: str = "main", model: ModelInfo | None = None):
        self.name = name
        self.doc_string = ""
        self.model = model
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.initializers: list[Value] = []   # order of the initializer list
        self.sparse_initializers: list[onnx.SparseTensorProto] = []
        self.quantization_annotation: list[onnx.TensorAnnotation] = []
        self.metadata_props: tuple = ()
        self.value_info_order: list[str] = []  # values that had value_info, in file order
        self._g = nx.MultiDiGraph()
        self._values: dict[str, Value] = {}
        self._order = itertools.count()
        self._names = itertools.count()
        self._op_names: set[str] | None = None  # built on first unique_op_name()

    # ---- values -------------------------------------------------------------------------
    def value(self, name: str) -> Value:
        try:
            return self._values[name]
        except KeyError:
            raise KeyError(f"no value named {name!r} in graph {self.name!r}") from None

    def has_value(self, name: str) -> bool:
        return name in self._values

    def values(self) -> Iterator[Value]:
        return iter(list(self._values.values()))

    def add_value(self, value: Value) -> Value:
        if value.name in self._values:
            raise GraphError(f"value {value.name!r} is defined twice in graph {self.name!r}")
        self._values[value.name] = value
        self._g.add_node(value)
        return value

    def unique_name(self, base: str) -> str:
        name = base
        while name in self._values:
            name = f"{base}_{next(self._names)}"
        return name

    def add_constant(self, name: str, array: np.ndarray | Tensor) -> Value:
        """A new initializer; `name` is made unique."""
        tensor = array if isinstance(array, Tensor) else Tensor.from_array(np.asarray(array))
        value = self.add_value(Value(self.unique_name(name), const=tensor))
        self.initializers.append(value)
        return value

    def set_const(self, value: Value, array: np.ndarray | Tensor) -> None:
        """Replace the data of an initializer (passes build new arrays; nothing mutates in place)."""
        if value.const is None:
            raise GraphError(f"{value.name!r} is not a constant")
        value.const = array if isinstance(array, Tensor) else Tensor.from_array(np.asarray(array))

    def is_const(self, value: Value | None) -> bool:
        return value is not None and self.constant(value) is not None

    def constant(self, value: Value | None) -> Tensor | None:
        """The data of `value` if it is constant: an initializer or a Constant node's output."""
        if value is None:
            return None
        if value.const is not None:
            return value.const
        op = self.producer(value)
        if op is not None and op.op_type == "Constant" and not op.domain:
            return constant_node_tensor(op)
        return None

    def rename_value(self, value: Value, new_name: str) -> None:
        if new_name in self._values:
            raise GraphError(f"value {new_name!r} already exists")
        del self._values[value.name]
        value.name = new_name
        self._values[new_name] = value

    # ---- ops ----------------------------------------------------------------------------
    def add_op(self, op_type: str, inputs: Iterable[Value | None], outputs: int | Iterable[str | Value] = 1,
               *, domain: str = "", name: str = "", attrs: dict[str, Any] | None = None,
               after: Op | None = None, before: Op | None = None) -> Op:
        """Create an op wired to `inputs`; new outputs are named from the op name when ints.
        `after`/`before` place it in the saved node order (topological order always wins)."""
        inputs = list(inputs)
        op = Op(op_type, domain, name or self.unique_op_name(op_type))
        for key, val in (attrs or {}).items():
            op.set_attr(key, val)
        if before is not None:
            op.order = before.order - 1e-3 * (1 + next(self._order) % 997) / 1000
        elif after is not None:
            op.order = after.order + 1e-3 * (1 + next(self._order) % 997) / 1000
        else:
            op.order = float(next(self._order)) + 1e6
        self._g.add_node(op)
        for slot, value in enumerate(inputs):
            if value is not None:
                self._g.add_edge(value, op, key=("in", slot))
        self._set_input_count(op, len(inputs))
        outs = [f"{op.name}_out{i}" for i in range(outputs)] if isinstance(outputs, int) else list(outputs)
        for slot, out in enumerate(outs):
            if isinstance(out, Value):
                value = out if out.name in self._values else self.add_value(out)
            else:
                value = self.add_value(Value(self.unique_name(out)))
            if self.producer(value) is not None:
                raise GraphError(f"value {value.name!r} already has a producer")
            self._g.add_edge(op, value, key=("out", slot))
        return op

    def unique_op_name(self, base: str) -> str:
        """A node name no op of this graph has (clones restart the counter, so check)."""
        taken = {op.name for op in self.ops()} if self._op_names is None else self._op_names
        self._op_names = taken
        name = f"{base}_edgeq{next(self._names)}"
        while name in taken:
            name = f"{base}_edgeq{next(self._names)}"
        taken.add(name)
        return name

    def _set_input_count(self, op: Op, count: int) -> None:
        self._g.nodes[op]["n_in"] = count

    def ops(self) -> list[Op]:
        return [n for n in self._g.nodes if isinstance(n, Op)]

    def ops_of_type(self, *op_types: str) -> list[Op]:
        return [op for op in self.topo_order() if op.op_type in op_types]

    def inputs_of(self, op: Op) -> list[Value | None]:
        """Slot-ordered inputs; None for an omitted optional input."""
        slots: list[Value | None] = [None] * self._g.nodes[op].get("n_in", 0)
        for value, _, key in self._g.in_edges(op, keys=True):
            if key[0] == "in":
                slots[key[1]] = value
        return slots

    inputs = inputs_of  # DESIGN.md name: graph.inputs(op) is taken by the graph-input list

    def outputs_of(self, op: Op) -> list[Value | None]:
        out: dict[int, Value] = {key[1]: value for _, value, key in self._g.out_edges(op, keys=True)}
        return [out.get(i) for i in range(max(out) + 1)] if out else []

    def implicit_inputs(self, op: Op) -> list[Value]:
        return [v for v, _, key in self._g.in_edges(op, keys=True) if key[0] == "implicit"]

    def producer(self, value: Value) -> Op | None:
        for op in self._g.predecessors(value):
            return op
        return None

    def consumers(self, value: Value) -> list[Op]:
        """Ops reading `value` (explicitly or from a subgraph), each once, in graph order."""
        return sorted(set(self._g.successors(value)), key=lambda op: op.order)

    def uses(self, value: Value) -> list[tuple[Op, int]]:
        """(op, slot) pairs reading `value` explicitly."""
        return sorted(((op, key[1]) for _, op, key in self._g.out_edges(value, keys=True) if key[0] == "in"),
                      key=lambda use: (use[0].order, use[1]))

    def is_graph_output(self, value: Value) -> bool:
        return any(v is value for v in self.outputs)

    def set_input(self, op: Op, slot: int, value: Value | None) -> None:
        for src, _, key in list(self._g.in_edges(op, keys=True)):
            if key == ("in", slot):
                self._g.remove_edge(src, op, key=key)
        if value is not None:
            self._g.add_edge(value, op, key=("in", slot))
        n_in = self._g.nodes[op].get("n_in", 0)
        self._set_input_count(op, max(n_in, slot + 1))

    def add_implicit_input(self, op: Op, value: Value) -> None:
        self._g.add_edge(value, op, key=("implicit", value.name))

    def take_over(self, old: Value, new: Value, suffix: str) -> None:
        """`new` replaces `old`: every reader reads `new`, which takes `old`'s name (graph outputs
        and downstream names stay); `old` is renamed `<name>_<suffix>`."""
        self.replace_all_uses(old, new)
        name = old.name
        self.rename_value(old, self.unique_name(f"{name}_{suffix}"))
        self.rename_value(new, name)

    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Point every reader of `old` (ops, subgraph captures, graph outputs) at `new`."""
        for _, op, key in list(self._g.out_edges(old, keys=True)):
            self._g.remove_edge(old, op, key=key)
            if key[0] == "implicit":
                for sub in _iter_subgraphs(op):
                    sub._rename_capture(old.name, new.name)
                self._g.add_edge(new, op, key=("implicit", new.name))
            else:
                self._g.add_edge(new, op, key=key)
        self.outputs = [new if v is old else v for v in self.outputs]

    def remove_op(self, op: Op, *, remove_outputs: bool = True) -> None:
        """Remove `op`; its outputs go too unless still read (then it's an error)."""
        for value in self.outputs_of(op):
            if value is None:
                continue
            if remove_outputs:
                if self._g.out_degree(value) or self.is_graph_output(value):
                    raise GraphError(f"cannot remove {op.name!r}: its output {value.name!r} is still used")
                self._drop_value(value)
        self._g.remove_node(op)

    remove = remove_op

    def remove_value(self, value: Value) -> None:
        """Remove an unused value (an initializer or a dead graph input)."""
        if self._g.out_degree(value) or self.is_graph_output(value):
            raise GraphError(f"value {value.name!r} is still used")
        self._drop_value(value)
        self.inputs = [v for v in self.inputs if v is not value]

    def _drop_value(self, value: Value) -> None:
        self._g.remove_node(value)
        del self._values[value.name]
        if value.const is not None:
            self.initializers = [v for v in self.initializers if v is not value]

    # ---- order and structure ------------------------------------------------------------
    def topo_order(self) -> list[Op]:
        """Ops in a topological order that keeps the original node order where it can."""
        try:
            order = nx.lexicographical_topological_sort(self._g, key=_sort_key)
            return [n for n in order if isinstance(n, Op)]
        except nx.NetworkXUnfeasible:
            cycle = nx.find_cycle(self._g)
            names = [n.name for edge in cycle for n in edge[:1] if isinstance(n, Op)]
            raise GraphError(f"graph {self.name!r} has a cycle through ops {names}",
                             fix="the model is malformed; re-export it") from None

    def renumber(self) -> None:
        """Make the current topological order the saved order (after heavy rewriting)."""
        for i, op in enumerate(self.topo_order()):
            op.order = float(i)

    def ancestors(self, value: Value) -> set[Op]:
        return {n for n in nx.ancestors(self._g, value) if isinstance(n, Op)}

    def upstream(self, value: Value) -> set[Value]:
        """Values `value` is computed from (transitively)."""
        return {n for n in nx.ancestors(self._g, value) if isinstance(n, Value)}

    def subgraphs(self) -> Iterator[Graph]:
        """Every nested graph, depth first."""
        for op in self.topo_order():
            for sub in _iter_subgraphs(op):
                yield sub
                yield from sub.subgraphs()

    def take_contents(self, other: "Graph") -> None:
        """Become `other` (in place), for passes that rebuild the whole graph: readers holding
        this Graph object see the result."""
        self.__dict__.update(other.__dict__)

    def _rename_capture(self, old: str, new: str) -> None:
        if old in self._values and self._values[old].outer:
            self.rename_value(self._values[old], new)
        for op in self.ops():
            for sub in _iter_subgraphs(op):
                sub._rename_capture(old, new)

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {len(self.ops())} ops, {len(self.initializers)} initializers)"


def constant_node_tensor(op: Op) -> Tensor | None:
    """The tensor a Constant node produces (sparse values are not decoded here)."""
    if "value" in op.attributes:
        proto = op.attributes["value"].t
        return Tensor(proto.data_type, tuple(proto.dims), proto=proto)
    for name, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                        ("value_int", np.int64), ("value_ints", np.int64)):
        if name in op.attributes:
            return Tensor.from_array(np.asarray(op.attr(name), dtype=dtype))
    return None


def _sort_key(node: Op | Value) -> tuple:
    return (node.order, node.name) if isinstance(node, Op) else (-1.0, node.name)


def _iter_subgraphs(op: Op) -> Iterator[Graph]:
    for sub in op.subgraphs.values():
        yield from (sub if isinstance(sub, list) else [sub])
