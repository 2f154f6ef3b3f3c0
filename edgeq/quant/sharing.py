"""The shared-weight guard of every fold (SmoothQuant, AWQ, the Hadamard rotation): a rewrite
may change a constant or a value only when nothing outside its match can see the change.

A constant that is also a graph input can be overridden by the caller (an overridable
initializer), and one that is a graph output is seen by the caller: changing either changes
what the model means, so neither is private, whatever reads it.
"""

from __future__ import annotations

from collections.abc import Iterable

from edgeq.ir import Graph, Op, Value


def is_private_constant(graph: Graph, value: Value | None, reader: Op) -> bool:
    """`value` is an initializer that only `reader` reads, and neither a graph input nor a
    graph output: it may be changed in place for a rewrite of `reader`."""
    return (value is not None and value.const is not None and graph.consumers(value) == [reader]
            and not graph.is_graph_output(value) and all(v is not value for v in graph.inputs))


def is_owned_by_match(graph: Graph, value: Value, match: Iterable[Op]) -> bool:
    """`value` is read by no op outside `match` and is not a graph output: a rewrite of the
    match may change what it holds."""
    ops = set(match)
    return not graph.is_graph_output(value) and all(reader in ops for reader in graph.consumers(value))
