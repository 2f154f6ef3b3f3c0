"""The attention core -> `MatMul(q, k_t)`, one scale `Mul(scores, c)` (or `Div(scores, c)`),
`Add(scaled, mask_bias)`, `Softmax(axis=-1)`, `MatMul(probs, v)`.

- attention-scale: a scalar scale applied to q and/or to k^T before their product (torch's SDPA
  decomposition scales each by d^-1/4) folds into one Mul on the scores (into the scores' own
  scale when there is one: a new constant, the old one stays for its other readers).
- attention-key-transpose: k^T as one `Transpose(., [0, 2, 3, 1])` of the unsplit heads becomes
  the head split then `Transpose(k, [0, 1, 3, 2])`.
- attention-nan-guard: the exporters' `Where(IsNaN(p), 0, p)` after the Softmax goes once nothing
  before the Softmax can be -inf (the mask bias is finite: see `mask.py`). Activations are taken
  as finite; what is checked is every float constant between the scores' MatMul and the Softmax,
  the mask's subgraph included (none may be infinite or beyond +-1e6, like float32's min that
  overflows when two masks add).
"""

from __future__ import annotations

import numpy as np

from edgeq.frontend.rules.base import Builder, Match, Rule, array, detach, out, scalar
from edgeq.ir import Graph, Op, Value

# Ops whose output is an activation: the finiteness walk stops there.
_ACTIVATION_SOURCES = frozenset({"MatMul", "Gemm", "MatMulInteger", "Conv", "Softmax", "LayerNormalization"})
_FINITE_LIMIT = 1e6


def _scale_of(graph: Graph, value: Value) -> tuple[Value, float, Op] | None:
    """(unscaled, factor, op) when `value` = Mul(v, c) | Mul(c, v) | Div(v, c) with c scalar."""
    op = graph.producer(value)
    if op is None or op.domain or op.op_type not in ("Mul", "Div"):
        return None
    a, b = graph.inputs_of(op)
    if op.op_type == "Div":
        c = scalar(graph, b)
        return (a, 1.0 / c, op) if c not in (None, 0.0) and not graph.is_const(a) else None
    for v, s in ((a, b), (b, a)):
        c = scalar(graph, s)
        if c is not None and not graph.is_const(v):
            return v, c, op
    return None


def softmax_after(graph: Graph, value: Value, steps: int = 3) -> Op | None:
    """The Softmax `value` reaches through at most `steps` single-reader elementwise ops."""
    for _ in range(steps + 1):
        readers = graph.consumers(value)
        if len(readers) != 1:
            return None
        reader = readers[0]
        if reader.op_type == "Softmax" and not reader.domain:
            return reader
        if reader.domain or reader.op_type not in ("Mul", "Div", "Add", "Where"):
            return None
        value = out(graph, reader)
    return None


class AttentionScale(Rule):
    name = "attention-scale"
    roots = frozenset({"MatMul"})

    def match(self, graph: Graph, op: Op) -> Match | None:
        a, b = graph.inputs_of(op)
        if a is None or b is None or graph.is_const(a) or graph.is_const(b):
            return None
        scores = out(graph, op)
        if softmax_after(graph, scores) is None:
            return None
        factor, ops, new_inputs = 1.0, [op], [a, b]
        for slot, value in enumerate((a, b)):
            found = _scale_of(graph, value)
            if found is not None and graph.consumers(value) == [op] and not graph.is_graph_output(value):
                new_inputs[slot], f, scale_op = found
                factor *= f
                ops.append(scale_op)
        if len(ops) == 1:
            return None
        existing = None
        readers = graph.consumers(scores)
        if len(readers) == 1 and not graph.is_graph_output(scores):
            found = _scale_of(graph, out(graph, readers[0]))
            existing = found[2] if found is not None and found[0] is scores else None
        return Match(op, ops, {"q": new_inputs[0], "k": new_inputs[1], "scores": scores},
                     {"factor": factor, "existing": existing})

    def rewrite(self, graph: Graph, match: Match) -> None:
        op, factor = match.root, match.params["factor"]
        graph.set_input(op, 0, match["q"])
        graph.set_input(op, 1, match["k"])
        existing: Op | None = match.params["existing"]
        b = Builder(graph, op)
        dtype = _dtype(graph, match["scores"])
        if existing is not None:
            slot = 1 if graph.inputs_of(existing)[0] is match["scores"] else 0
            c = scalar(graph, graph.inputs_of(existing)[slot])
            c = c / factor if existing.op_type == "Div" else c * factor
            graph.set_input(existing, slot, b.const("scale", c, dtype))
            return
        scores = match["scores"]
        detach(graph, op)
        product = b.op("MatMul", match["q"], match["k"])
        b.op("Mul", product, b.const("scale", factor, dtype), out=scores)


def _dtype(graph: Graph, value: Value) -> type:
    return np.float16 if value.elem_type == 10 else np.float32


class KeyTranspose(Rule):
    """k^T written as one `Transpose(Reshape(k), [0, 2, 3, 1])` (the TorchScript exporter merges
    the head split and the transpose) -> the head split `[0, 2, 1, 3]` then `[0, 1, 3, 2]`."""

    name = "attention-key-transpose"
    roots = frozenset({"Transpose"})

    def match(self, graph: Graph, op: Op) -> Match | None:
        if op.attr("perm") != [0, 2, 3, 1]:
            return None
        value = out(graph, op)
        readers = graph.consumers(value)
        if len(readers) != 1 or graph.is_graph_output(value):
            return None
        reader = readers[0]
        scaled = _scale_of(graph, out(graph, reader)) if reader.op_type in ("Mul", "Div") else None
        if scaled is not None and scaled[0] is value and len(graph.consumers(out(graph, reader))) == 1:
            reader = graph.consumers(out(graph, reader))[0]
        ins = graph.inputs_of(reader)
        if reader.op_type != "MatMul" or reader.domain or len(ins) != 2 or graph.is_const(ins[0]):
            return None
        if softmax_after(graph, out(graph, reader)) is None:
            return None
        return Match(op, [op], {"x": graph.inputs_of(op)[0], "y": value})

    def rewrite(self, graph: Graph, match: Match) -> None:
        b = Builder(graph, match.root)
        detach(graph, match.root)
        heads = b.op("Transpose", match["x"], perm=[0, 2, 1, 3])
        b.op("Transpose", heads, out=match["y"], perm=[0, 1, 3, 2])


class NanGuard(Rule):
    name = "attention-nan-guard"
    roots = frozenset({"IsNaN"})

    def match(self, graph: Graph, op: Op) -> Match | None:
        p = graph.inputs_of(op)[0]
        softmax = graph.producer(p) if p is not None else None
        if softmax is None or softmax.op_type != "Softmax" or softmax.domain:
            return None
        for where in graph.consumers(out(graph, op)):
            ins = graph.inputs_of(where)
            zero = array(graph, ins[1]) if where.op_type == "Where" and len(ins) == 3 else None
            if (zero is not None and ins[0] is out(graph, op) and ins[2] is p and not np.any(zero)
                    and not graph.is_graph_output(out(graph, where))):
                return Match(op, [where, op], {"p": p, "y": out(graph, where)}, {"softmax": softmax})
        return None

    def check(self, graph: Graph, match: Match) -> str | None:
        bad = non_finite_before(graph, match.params["softmax"])
        return None if bad is None else f"the Softmax input may be -inf ('{bad}' is not finite)"

    def rewrite(self, graph: Graph, match: Match) -> None:
        graph.replace_all_uses(match["y"], match["p"])


def non_finite_before(graph: Graph, softmax: Op) -> str | None:
    """The name of a float constant that may make the Softmax's input infinite (-inf, float
    min), searching back to the activations; None when there is none."""
    stack = [graph.inputs_of(softmax)[0]]
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        if value is None or id(value) in seen:
            continue
        seen.add(id(value))
        data = array(graph, value)
        if data is not None:
            if data.dtype.kind == "f" and data.size and (
                    not np.all(np.isfinite(data)) or np.abs(data).max() > _FINITE_LIMIT):
                return value.name
            continue
        op = graph.producer(value)
        if op is None or op.op_type in _ACTIVATION_SOURCES or op.op_type in ("Shape", "Size"):
            continue
        stack.extend(graph.inputs_of(op))
    return None


RULES = (AttentionScale(), KeyTranspose(), NanGuard())
