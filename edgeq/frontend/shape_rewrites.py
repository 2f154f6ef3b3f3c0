"""Shape arithmetic that depends on dynamic axes, rewritten into the canonical forms
(canonical.md item 7), each rewrite decided from what the graph computes at probe sizes.

- `Reshape(x, s)` with a computed `s` gets a constant shape: a literal where the output dim is
  the same at every probe, 0 where it equals the input's dim at that index at every probe, and
  -1 for at most one other dim (e.g. `[0, 0, H, d]`, `[0, 0, H*d]`, `[0, H, -1, d]`).
- A computed Reshape or Expand whose output has its input's shape at every probe is bypassed.
- `Expand(x, s)` with a computed `s` gets a constant shape: 1 where the output keeps the
  input's dim, a literal where the output dim is the same at every probe (e.g. the GQA repeat
  `[1, 1, n_rep, 1, 1]`); expanding to a dynamic size cannot be written so and is left.
- Shape arithmetic that reads only shapes and is the same at every probe (e.g. the rotary half
  `Div(Gather(Shape(q), 3), 2)` once the head dim is static) becomes a constant: onnxscript's
  folder cannot fold it when the exporter declared the dims symbolic or a Reshape shape was
  computed, and it does not depend on a dynamic axis.
- A chain of movement ops (Reshape/Transpose/Squeeze/Unsqueeze/Flatten, every intermediate read
  only by the next) whose result is a permutation of its input becomes one `Transpose` (the
  dynamo exporter's k^T: `Reshape(k, [-1, S, d])`, `Transpose([0, 2, 1])`, `Reshape([B, H, d, S])`
  is `Transpose(k, [0, 1, 3, 2])`): an index tensor is pushed through the chain at every probe.

Every rewrite must reproduce the shapes (for chains, the element order) of every probe; a
computed shape that reads tensor values, not only shapes, is never replaced. What cannot be
expressed is left, with its reason. `plan(graph)` decides, `apply(graph, plan)` rewrites.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from edgeq.frontend.probing import ProbeError, make_probes, run_probes
from edgeq.ir import Graph, Op, Value

MOVEMENT = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})
# Ops whose output is not a function of their inputs' shapes even when they read nothing else.
_NOT_SHAPE_FUNCTIONS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                                  "Multinomial", "Bernoulli"})
_FOLD_BYTES = 1 << 16

# Reasons a computed shape is left as it is (pass stats keys: "left_" + reason).
NEEDS_TWO_INFERRED_DIMS = "two_dynamic_dims_not_at_input_positions"
READS_VALUES = "shape_reads_tensor_values"
EXPANDS_TO_DYNAMIC = "expands_to_a_dynamic_size"
RANK_VARIES = "rank_varies_between_probes"
NOT_REPRODUCED = "no_constant_form_reproduces_the_probes"


@dataclass
class Rewrite:
    op: Op                               # the Reshape/Expand, or the last op of a chain
    constant: tuple[int, ...] = ()       # its new constant shape (Reshape/Expand)
    chain: list[Op] = field(default_factory=list)  # movement ops replaced by one Transpose
    perm: tuple[int, ...] = ()
    identity: bool = False               # the op gives its input back at every probe: bypassed


@dataclass
class Plan:
    rewrites: list[Rewrite] = field(default_factory=list)
    folds: list[tuple[Value, np.ndarray]] = field(default_factory=list)  # static shape arithmetic
    left: list[tuple[Op, str]] = field(default_factory=list)
    probes: int = 0
    probe_error: str = ""

    def reasons(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, reason in self.left:
            counts[reason] = counts.get(reason, 0) + 1
        return counts


def computed_shape_ops(graph: Graph) -> list[Op]:
    """Reshape and Expand ops of the top-level graph whose shape input is not a constant."""
    return [op for op in graph.topo_order() if op.op_type in ("Reshape", "Expand") and not op.domain
            and len(graph.inputs_of(op)) > 1 and not graph.is_const(graph.inputs_of(op)[1])]


def plan(graph: Graph) -> Plan:
    """Decide every rewrite (probing the graph once, for all candidates together)."""
    result = Plan()
    shape_only: dict[int, bool] = {}
    candidates = []
    for op in computed_shape_ops(graph):
        if _reads_shapes_only(graph, graph.inputs_of(op)[1], shape_only):
            candidates.append(op)
        else:
            result.left.append((op, READS_VALUES))
    chains = [chain for chain in _chains(graph)
              if all(op.op_type != "Reshape" or _reads_shapes_only(graph, graph.inputs_of(op)[1], shape_only)
                     for op in chain)]
    frontier = _static_candidates(graph, shape_only)
    if not candidates and not chains and not frontier:
        return result  # nothing to decide: no probe run
    wanted: dict[str, Value] = {}
    for op in candidates:
        for value in (graph.inputs_of(op)[0], graph.outputs_of(op)[0]):
            wanted[value.name] = value
    for chain in chains:
        wanted[graph.inputs_of(chain[0])[0].name] = graph.inputs_of(chain[0])[0]
        for op in chain:
            wanted[graph.outputs_of(op)[0].name] = graph.outputs_of(op)[0]
    try:
        probes = make_probes(graph)
        runs = run_probes(graph, probes, shapes_of=list(wanted.values()), values_of=frontier)
    except ProbeError as err:
        result.probe_error = err.problem
        result.left += [(op, "probe_failed") for op in candidates]
        return result
    result.probes = len(probes)
    shapes = [shapes for shapes, _ in runs]
    for value in frontier:
        arrays = [values[value.name] for _, values in runs]
        if arrays[0].nbytes <= _FOLD_BYTES and all(
                a.dtype == arrays[0].dtype and a.shape == arrays[0].shape and np.array_equal(a, arrays[0])
                for a in arrays[1:]):
            result.folds.append((value, arrays[0]))
    in_chain: set[int] = set()
    for chain in chains:
        for rewrite in _chain_rewrites(graph, chain, shapes):
            result.rewrites.append(rewrite)
            in_chain.update(id(op) for op in rewrite.chain)
    for op in candidates:
        if id(op) in in_chain:
            continue
        ins = [s[graph.inputs_of(op)[0].name] for s in shapes]
        outs = [s[graph.outputs_of(op)[0].name] for s in shapes]
        if ins == outs and not graph.is_graph_output(graph.outputs_of(op)[0]):
            result.rewrites.append(Rewrite(op, identity=True))  # reshapes or expands to its own shape
            continue
        decided = reshape_constant(ins, outs) if op.op_type == "Reshape" else expand_constant(ins, outs)
        if isinstance(decided, str):
            result.left.append((op, decided))
        else:
            result.rewrites.append(Rewrite(op, constant=decided))
    return result


def apply(graph: Graph, plan_: Plan) -> dict[str, int]:
    """Rewrite the graph as planned; counts by kind."""
    counts = {"reshapes": 0, "expands": 0, "chains_to_transpose": 0, "static_shape_values": 0, "identities": 0}
    shared: dict[tuple[int, ...], Value] = {}
    for value, array in plan_.folds:
        const = graph.add_constant(value.name + "_static", array)
        graph.replace_all_uses(value, const)
        counts["static_shape_values"] += 1
    for rewrite in plan_.rewrites:
        if rewrite.chain:
            _replace_chain(graph, rewrite)
            counts["chains_to_transpose"] += 1
            continue
        op = rewrite.op
        if rewrite.identity:
            graph.replace_all_uses(graph.outputs_of(op)[0], graph.inputs_of(op)[0])
            graph.remove_op(op)
            counts["identities"] += 1
            continue
        const = shared.get(rewrite.constant)
        if const is None:
            const = graph.add_constant(f"{op.op_type.lower()}_shape", np.asarray(rewrite.constant, np.int64))
            shared[rewrite.constant] = const
        graph.set_input(op, 1, const)
        op.attributes.pop("allowzero", None)  # 0 copies the input's dim (allowzero=0, the default)
        counts["reshapes" if op.op_type == "Reshape" else "expands"] += 1
    return counts


# ---- decisions from probe shapes -------------------------------------------------------------


def reshape_constant(ins: list[tuple[int, ...]], outs: list[tuple[int, ...]]) -> tuple[int, ...] | str:
    """The Reshape shape with literals, 0 and one -1 giving `outs[p]` from `ins[p]` for every
    probe p, or the reason there is none."""
    if len({len(o) for o in outs}) != 1:
        return RANK_VARIES
    shape = []
    for j in range(len(outs[0])):
        dims = [o[j] for o in outs]
        if len(set(dims)) == 1:
            shape.append(dims[0])
        elif all(j < len(i) and i[j] == o[j] for i, o in zip(ins, outs)):
            shape.append(0)
        else:
            shape.append(-1)
    if shape.count(-1) > 1:
        return NEEDS_TWO_INFERRED_DIMS
    shape_t = tuple(shape)
    if not all(_reshaped(i, shape_t) == o for i, o in zip(ins, outs)):
        return NOT_REPRODUCED
    return shape_t


def expand_constant(ins: list[tuple[int, ...]], outs: list[tuple[int, ...]]) -> tuple[int, ...] | str:
    """The Expand shape with 1 where the output keeps the input's dim and literals elsewhere,
    giving `outs[p]` from `ins[p]` for every probe p, or the reason there is none."""
    if len({len(o) for o in outs}) != 1:
        return RANK_VARIES
    rank = len(outs[0])
    shape = []
    for j in range(rank):
        kept = [(i[j - rank + len(i)] if j >= rank - len(i) else 1) for i in ins]
        dims = [o[j] for o in outs]
        if kept == dims:
            shape.append(1)
        elif len(set(dims)) == 1:
            shape.append(dims[0])
        else:
            return EXPANDS_TO_DYNAMIC
    shape_t = tuple(shape)
    if not all(_broadcast(i, shape_t) == o for i, o in zip(ins, outs)):
        return NOT_REPRODUCED
    return shape_t


def _reshaped(src: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...] | None:
    out = []
    for j, d in enumerate(shape):
        if d == 0:
            if j >= len(src):
                return None
            out.append(src[j])
        else:
            out.append(d)
    total = int(np.prod(src, dtype=np.int64))
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1], dtype=np.int64))
        if known == 0 or total % known:
            return None
        out[out.index(-1)] = total // known
    return tuple(out) if int(np.prod(out, dtype=np.int64)) == total else None


def _broadcast(src: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...] | None:
    try:
        return tuple(np.broadcast_shapes(tuple(src), tuple(shape)))
    except ValueError:
        return None


def _reads_shapes_only(graph: Graph, value: Value | None, memo: dict[int, bool]) -> bool:
    """True when `value` is computed from constants and the shapes of tensors only (every path
    up ends in a constant or a Shape/Size), never from a tensor's values."""
    if value is None or graph.is_const(value):
        return True
    key = id(value)
    if key in memo:
        return memo[key]
    memo[key] = False  # cycle guard (graphs are acyclic; this only bounds the walk)
    producer = graph.producer(value)
    if producer is None or producer.domain or producer.subgraphs or producer.op_type in _NOT_SHAPE_FUNCTIONS:
        result = False
    elif producer.op_type in ("Shape", "Size"):
        result = True
    else:
        result = all(_reads_shapes_only(graph, v, memo) for v in graph.inputs_of(producer))
    memo[key] = result
    return result


def _static_candidates(graph: Graph, memo: dict[int, bool]) -> list[Value]:
    """Values computed from shapes only (not constants) that an op computing on tensor values
    reads: where shape arithmetic meets the datapath. Reshape/Expand shapes are decided apart."""
    found: dict[str, Value] = {}
    for op in graph.topo_order():
        if op.domain or op.subgraphs:
            continue
        outs = [v for v in graph.outputs_of(op) if v is not None]
        if all(_reads_shapes_only(graph, v, memo) for v in outs):
            continue  # still shape arithmetic: its own readers decide
        for slot, value in enumerate(graph.inputs_of(op)):
            if value is None or graph.is_const(value) or value.outer or value.name in found:
                continue
            if op.op_type in ("Reshape", "Expand") and slot == 1:
                continue
            if value.elem_type is None or graph.is_graph_output(value):
                continue
            if _reads_shapes_only(graph, value, memo):
                found[value.name] = value
    return list(found.values())


# ---- movement chains ---------------------------------------------------------------------------


def _is_movement(graph: Graph, op: Op) -> bool:
    if op.domain or op.op_type not in MOVEMENT or op.subgraphs:
        return False
    ins = graph.inputs_of(op)
    # Squeeze/Unsqueeze axes must be constant (opset 13+ inputs); a Reshape's shape may be computed.
    if op.op_type in ("Squeeze", "Unsqueeze") and len(ins) > 1 and ins[1] is not None \
            and not graph.is_const(ins[1]):
        return False
    return len([v for v in graph.outputs_of(op) if v is not None]) == 1


def _chains(graph: Graph) -> list[list[Op]]:
    """Maximal paths of movement ops whose intermediate values are read only by the next op;
    only those with two or more ops, where some sub-path keeps its rank (a permutation must)."""
    chains = []
    for op in graph.topo_order():
        if not _is_movement(graph, op):
            continue
        source = graph.inputs_of(op)[0]
        prev = graph.producer(source) if source is not None else None
        if prev is not None and _is_movement(graph, prev) and _links(graph, source):
            continue  # not the start of a chain
        chain = [op]
        while True:
            out = graph.outputs_of(chain[-1])[0]
            readers = graph.consumers(out)
            if len(readers) != 1 or not _links(graph, out) or not _is_movement(graph, readers[0]):
                break
            if graph.inputs_of(readers[0])[0] is not out:
                break
            chain.append(readers[0])
        if len(chain) >= 2 and _may_permute(graph, chain):
            chains.append(chain)
    return chains


def _may_permute(graph: Graph, chain: list[Op]) -> bool:
    """Some sub-chain that `_chain_rewrites` would try (two or more ops, no Transpose at either
    end) may keep its rank (unknown ranks may)."""
    ranks = [None if v.shape is None else len(v.shape)
             for v in [graph.inputs_of(chain[0])[0]] + [graph.outputs_of(op)[0] for op in chain]]
    return any((ranks[i] is None or ranks[j] is None or ranks[i] == ranks[j])
               and chain[i].op_type != "Transpose" and chain[j - 1].op_type != "Transpose"
               for i in range(len(chain)) for j in range(i + 2, len(chain) + 1))


def _links(graph: Graph, value: Value) -> bool:
    """`value` may vanish inside a chain: one reader, explicit, not a graph output."""
    readers = graph.consumers(value)
    return (len(readers) == 1 and not graph.is_graph_output(value)
            and [slot for _, slot in graph.uses(value)] == [0]
            and not graph.implicit_inputs(readers[0]))


def _chain_rewrites(graph: Graph, chain: list[Op], shapes: list[dict]) -> list[Rewrite]:
    """The longest sub-chains (two ops or more, neither end a Transpose) that are one
    permutation, left to right."""
    values = [graph.inputs_of(chain[0])[0]] + [graph.outputs_of(op)[0] for op in chain]
    found, i = [], 0
    while i < len(chain) - 1:
        for j in range(len(chain), i + 1, -1):
            sub = chain[i:j]
            if sub[0].op_type == "Transpose" or sub[-1].op_type == "Transpose":
                continue  # a Transpose at either end stays itself (the canonical head split, k^T)
            if len(shapes[0][values[i].name]) != len(shapes[0][values[j].name]):
                continue
            perm = _permutation(sub, values[i:j + 1], shapes)
            if perm is not None:
                found.append(Rewrite(sub[-1], chain=list(sub), perm=perm))
                i = j
                break
        else:
            i += 1
    return found


def _permutation(ops: list[Op], values: list[Value], shapes: list[dict]) -> tuple[int, ...] | None:
    """The permutation the chain applies to its input at every probe, or None."""
    perm_found = None
    for probe in shapes:
        start = probe[values[0].name]
        index = np.arange(int(np.prod(start, dtype=np.int64)), dtype=np.int64).reshape(start)
        moved = index
        for op, out in zip(ops, values[1:]):
            if op.op_type == "Transpose":
                perm = op.attr("perm")
                moved = np.transpose(moved, perm if perm is not None else None)
            else:
                moved = moved.reshape(probe[out.name])
            if moved.shape != tuple(probe[out.name]):
                return None
        matches = [p for p in itertools.permutations(range(len(start)))
                   if tuple(start[k] for k in p) == moved.shape and np.array_equal(np.transpose(index, p), moved)]
        if perm_found is None:
            if not matches:
                return None
            perm_found = matches
        else:
            perm_found = [p for p in perm_found if p in matches]
            if not perm_found:
                return None
    return perm_found[0] if perm_found else None


def _replace_chain(graph: Graph, rewrite: Rewrite) -> None:
    source = graph.inputs_of(rewrite.chain[0])[0]
    result = graph.outputs_of(rewrite.chain[-1])[0]
    last = rewrite.chain[-1]
    graph.remove_op(last, remove_outputs=False)
    if rewrite.perm == tuple(range(len(rewrite.perm))) and not graph.is_graph_output(result):
        graph.replace_all_uses(result, source)
        graph.remove_value(result)
    else:
        graph.add_op("Transpose", [source], [result], attrs={"perm": list(rewrite.perm)}, after=last)
    for op in reversed(rewrite.chain[:-1]):
        out = graph.outputs_of(op)[0]
        if not graph.consumers(out) and not graph.is_graph_output(out):
            graph.remove_op(op)
