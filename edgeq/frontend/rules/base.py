"""The rule protocol of the front end (after onnxscript's rewrite rules, e.g.
`onnxscript/rewriter/rules/common/_fuse_batchnorm.py`): a rule has a name, the op kinds it is
tried at, a `match` (the pattern: structure only, None when it does not apply), a `check` that
returns the reason it refuses (None: go) and a `rewrite`. `apply_rules` runs rules to a fixed
point and counts what each did.

A rewrite never renames what the rest of the graph reads: the new ops write the matched
outputs' own `Value`s (so a graph output keeps its name), and the matched ops left without
readers are removed (`sweep`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np
import onnx

from edgeq.ir import Graph, Op, Value
from edgeq.quant.sharing import is_owned_by_match


@dataclass
class Match:
    """What a rule's pattern found: the op it was tried at, every op of the match, named values
    (`x`, `gamma`, ...; an absent optional one is None) and plain parameters (`epsilon`, ...)."""

    root: Op
    ops: list[Op]
    values: dict[str, Value | None] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Value | None:
        return self.values[name]


class Rule(ABC):
    """One exporter variant of a concept and its rewrite into the canonical form."""

    name: ClassVar[str]
    roots: ClassVar[frozenset[str]]   # op kinds (`Op.kind`: 'Erf', 'com.microsoft::Gelu') tried

    @abstractmethod
    def match(self, graph: Graph, op: Op) -> Match | None:
        """The pattern at `op` (structure only), or None. Never matches the canonical form."""

    def check(self, graph: Graph, match: Match) -> str | None:
        """Why the rule refuses this match (a short reason), or None to rewrite it."""
        return None

    @abstractmethod
    def rewrite(self, graph: Graph, match: Match) -> None:
        """Replace the match by the canonical form (the matched outputs keep their Values)."""


@dataclass
class RuleReport:
    """Rewrites per rule, and the matches each rule refused (op name -> reason)."""

    applied: Counter = field(default_factory=Counter)
    refused: dict[tuple[str, str], str] = field(default_factory=dict)   # (rule, op name) -> reason

    def stats(self) -> dict[str, int]:
        out = {name: count for name, count in sorted(self.applied.items())}
        reasons = Counter(f"{rule} refused: {reason}" for (rule, _), reason in self.refused.items())
        out.update(sorted(reasons.items()))
        return out


def apply_rules(graph: Graph, rules: Sequence[Rule], report: RuleReport | None = None, *,
                max_rounds: int = 16) -> RuleReport:
    """Apply `rules` (in order, at every op of their kinds) until none rewrites anything.
    Refusals are kept only for ops still in the graph at the end."""
    report = report if report is not None else RuleReport()
    for _ in range(max_rounds):
        changed = False
        for rule in rules:
            alive = set(graph.ops())
            for op in sorted(alive, key=lambda o: o.order):
                if op not in alive or op.kind not in rule.roots:
                    continue
                found = rule.match(graph, op)
                if found is None:
                    continue
                reason = rule.check(graph, found)
                if reason is not None:
                    report.refused[(rule.name, op.name)] = reason
                    continue
                report.refused.pop((rule.name, op.name), None)
                rule.rewrite(graph, found)
                sweep(graph, found.ops)
                report.applied[rule.name] += 1
                changed = True
                alive = set(graph.ops())
        if not changed:
            break
    names = {op.name for op in graph.ops()}
    report.refused = {key: reason for key, reason in report.refused.items() if key[1] in names}
    return report


# ---- graph helpers shared by the rules -------------------------------------------------------

def sweep(graph: Graph, ops: Iterable[Op]) -> int:
    """Remove the ops among `ops` (and, transitively, their producers among them) that nothing
    reads any more. Returns how many went."""
    pending = list(ops)
    alive = set(graph.ops())
    removed = 0
    progress = True
    while progress:
        progress = False
        for op in list(pending):
            if op not in alive:
                pending.remove(op)
                continue
            outs = [v for v in graph.outputs_of(op) if v is not None]
            if any(graph.consumers(v) or graph.is_graph_output(v) for v in outs):
                continue
            graph.remove_op(op)
            alive.discard(op)
            pending.remove(op)
            removed += 1
            progress = True
    return removed


def sweep_dead(graph: Graph) -> int:
    """Remove every op of the graph whose outputs nothing reads (dead code)."""
    return sweep(graph, reversed(graph.topo_order()))


def detach(graph: Graph, op: Op) -> list[Value | None]:
    """Remove `op` but keep its output Values (now without a producer) for new ops to write."""
    outs = graph.outputs_of(op)
    graph.remove_op(op, remove_outputs=False)
    return outs


def array(graph: Graph, value: Value | None) -> np.ndarray | None:
    tensor = graph.constant(value)
    return None if tensor is None else tensor.numpy()


def scalar(graph: Graph, value: Value | None) -> float | None:
    """The value of a one-element float/int constant, else None."""
    data = array(graph, value)
    if data is None or data.size != 1 or data.dtype.kind not in "fiu":
        return None
    return float(data.reshape(()))


def is_scalar(graph: Graph, value: Value | None, expected: float, rtol: float = 1e-6) -> bool:
    got = scalar(graph, value)
    return got is not None and abs(got - expected) <= rtol * max(1.0, abs(expected))


def only_reader(graph: Graph, value: Value | None, op_type: str | None = None) -> Op | None:
    """The one op reading `value` (once), when `value` is not a graph output; else None."""
    if value is None or graph.is_graph_output(value):
        return None
    uses = graph.uses(value)
    if len(uses) != 1 or len(graph.consumers(value)) != 1:
        return None
    reader = uses[0][0]
    return reader if op_type is None or reader.op_type == op_type and not reader.domain else None


def producer(graph: Graph, value: Value | None, *op_types: str) -> Op | None:
    """The default-domain op of one of `op_types` that produces `value`."""
    if value is None:
        return None
    op = graph.producer(value)
    return op if op is not None and not op.domain and op.op_type in op_types else None


def out(graph: Graph, op: Op) -> Value:
    return graph.outputs_of(op)[0]


def other(graph: Graph, op: Op, value: Value) -> Value | None:
    """The other input of a binary op (`Mul(value, ·)` or `Mul(·, value)`)."""
    ins = graph.inputs_of(op)
    if len(ins) != 2:
        return None
    if ins[0] is value:
        return ins[1]
    if ins[1] is value:
        return ins[0]
    return None


def reduce_axes(graph: Graph, op: Op) -> list[int] | None:
    """ReduceMean's axes, from its input (opset 18+) or its attribute."""
    ins = graph.inputs_of(op)
    if len(ins) > 1 and ins[1] is not None:
        data = array(graph, ins[1])
        return None if data is None else [int(a) for a in data.reshape(-1)]
    axes = op.attr("axes")
    return None if axes is None else [int(a) for a in axes]


def last_axis_only(axes: list[int] | None, rank: int | None) -> bool:
    return axes is not None and len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


def rank_of(value: Value) -> int | None:
    shape = value.shape
    return None if shape is None else len(shape)


def opset(graph: Graph) -> int:
    info = graph.model
    imports = info.opset_imports if info is not None else {"": 21}
    return int(imports.get("", imports.get("ai.onnx", 21)))


def owned(graph: Graph, match_ops: Iterable[Op], *values: Value | None) -> bool:
    """Every value is read only inside the match (and is not a graph output)."""
    ops = list(match_ops)
    return all(v is None or is_owned_by_match(graph, v, ops) for v in values)


def inner_values_owned(graph: Graph, match_ops: Sequence[Op], exits: Iterable[Value]) -> bool:
    """Every output of the matched ops except `exits` is read only inside the match."""
    keep = {id(v) for v in exits}
    return all(is_owned_by_match(graph, v, match_ops) for op in match_ops for v in graph.outputs_of(op)
               if v is not None and id(v) not in keep)


def vector_for_last_axis(graph: Graph, value: Value | None) -> np.ndarray | None:
    """A constant that broadcasts along the last axis only ([D], [1, D], [1, 1, D]) as a [D]
    vector, else None."""
    data = array(graph, value)
    if data is None or data.ndim == 0 or any(d != 1 for d in data.shape[:-1]):
        return None
    return data.reshape(-1)


class Builder:
    """Adds ops next to `anchor` in the saved order, named after it (or after `prefix`)."""

    def __init__(self, graph: Graph, anchor: Op, prefix: str | None = None):
        self.graph = graph
        self.prefix = anchor.name if prefix is None else prefix
        self.order = anchor.order

    def op(self, op_type: str, *inputs: Value | None, domain: str = "", out: Value | None = None,
           n_out: int = 1, **attrs: Any) -> Value:
        return self.ops(op_type, *inputs, domain=domain, outs=[out] if out is not None else None,
                        n_out=n_out, **attrs)[0]

    def ops(self, op_type: str, *inputs: Value | None, domain: str = "", outs: list[Value] | None = None,
            n_out: int = 1, **attrs: Any) -> list[Value]:
        graph = self.graph
        name = graph.unique_op_name(f"{self.prefix}/{op_type}")
        inputs = list(inputs)
        while inputs and inputs[-1] is None:  # omitted trailing optional inputs
            inputs.pop()
        op = graph.add_op(op_type, inputs, outs if outs is not None else n_out, domain=domain, name=name,
                          attrs={k: v for k, v in attrs.items() if v is not None})
        self.order += 1e-6
        op.order = self.order
        return graph.outputs_of(op)

    def const(self, name: str, data: Any, dtype: Any = np.float32) -> Value:
        base = f"{self.prefix}/{name}"
        return self.graph.add_constant(base, np.asarray(data, dtype=dtype))

    def axes(self, op_type: str, x: Value, axes: list[int], **attrs: Any) -> Value:
        """Unsqueeze/Squeeze/ReduceMean with `axes` as the graph's opset writes them."""
        since = {"Unsqueeze": 13, "Squeeze": 13, "ReduceMean": 18}[op_type]
        if opset(self.graph) >= since:
            return self.op(op_type, x, self.const("axes", axes, np.int64), **attrs)
        return self.op(op_type, x, axes=list(axes), **attrs)


FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                         onnx.TensorProto.DOUBLE})
