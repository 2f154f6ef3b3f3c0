"""The attention-mask bias -> one canonical subgraph per model, shared by every layer, c = -10000:

- key padding [B, 1, 1, T]: `Mul(Sub(1.0, Cast(Unsqueeze(attention_mask, [1, 2]), to=FLOAT)), c)`
- causal [1, 1, S, T]: `Mul(Sub(1.0, Cast(Unsqueeze(LessOrEqual(Unsqueeze(Range(0, T, 1), [0]),
  Unsqueeze(Range(T - S, T, 1), [1])), [0, 1]), to=FLOAT)), c)`, T = dim 1 of attention_mask (past
  + new tokens), S = dim 1 of input_ids
- both: `Add(padding, causal)` [B, 1, S, T].

A mask is recognised by what it computes, not by its ops. A bias that reaches a Softmax's input
through `Add` (or a `Where` choosing between the scores and a fill of -1e4 or less) and reads by
value only the attention mask and position inputs (any value's shape, and constants) is run in
ONNX Runtime on probe inputs: several batch and sequence sizes, padding at the end and at the
start, a past length where the graph has past key/value inputs. When one canonical function
matches every probe (0 where attended, -1e4 or less or -inf where masked, a shape broadcasting
as [B|1, 1|H, S|1, T]), every use of the bias reads the canonical subgraph instead; a `Where`
becomes `Add(scores, bias)`. Anything else is left as it is and named in the report.

Numbers: outputs are unchanged except in rows whose every key is masked (a query that is itself
padding under a causal mask with padding at the start): -inf gave NaN there (the exporters' guard
made it 0) and float32's min a uniform average, while a finite bias gives the softmax of the raw
scores. Those rows are padding positions, which no caller reads.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

from edgeq.frontend.rules.base import Builder, detach, opset, out, scalar, sweep
from edgeq.frontend.rules.probe import session, sub_model
from edgeq.ir import Graph, Op, Value

C = -10000.0
MASKED = -1e4                # a bias at or below this masks (float32 min, -inf and c included)
KINDS = ("key-padding", "causal", "causal+padding")
_POSITION_INPUTS = ("position_ids", "cache_position")


@dataclass
class MaskReport:
    replaced: Counter = field(default_factory=Counter)     # kind -> sites (Softmax inputs) rewritten
    canonical: dict[str, Value] = field(default_factory=dict)
    already: int = 0                                        # sites already reading a canonical bias
    unrecognised: dict[str, str] = field(default_factory=dict)   # bias name -> why

    def stats(self) -> dict[str, int]:
        out = {f"mask {kind}": n for kind, n in sorted(self.replaced.items())}
        if self.already:
            out["mask already canonical"] = self.already
        out.update({f"mask unrecognised: {name} ({why})": 1 for name, why in sorted(self.unrecognised.items())})
        return out


@dataclass
class _Site:
    op: Op                      # the Add or Where feeding the Softmax
    source: Value               # the bias (Add) or the condition (Where)
    slot: int = 0               # Add: the bias's input slot
    where_allows: bool = True   # Where: True when cond selects the scores


def canonicalize_masks(graph: Graph) -> MaskReport:
    report = MaskReport()
    if opset(graph) < 13:  # Softmax's axis and Unsqueeze's axes changed at 13: run after convert-opset
        return report
    inputs = _Inputs.of(graph)
    sites: dict[int, list[_Site]] = {}
    for softmax in graph.ops_of_type("Softmax"):
        site = _site(graph, softmax, inputs)
        if site is None:
            continue
        kind = canonical_kind(graph, site.source) if site.op.op_type == "Add" else None
        if kind is not None:
            report.already += 1
            report.canonical.setdefault(kind, site.source)
            continue
        sites.setdefault(id(site.source), []).append(site)
    dead: list[Op] = []
    groups = list(sites.values())
    for group, (kind, why) in zip(groups, _recognise(graph, groups, inputs) if groups else []):
        source = group[0].source
        if kind is None:
            report.unrecognised[source.name] = why
            continue
        if kind not in report.canonical:
            dtype = np.float16 if _dtype(graph, group[0].op) == onnx.TensorProto.FLOAT16 else np.float32
            report.canonical[kind] = _build(graph, kind, inputs, dtype)
        bias = report.canonical[kind]
        dead.extend(graph.ancestors(source))
        for site in group:
            if site.op.op_type == "Add":
                graph.set_input(site.op, site.slot, bias)
            else:
                scores = graph.inputs_of(site.op)[1 if site.where_allows else 2]
                b = Builder(graph, site.op)
                y = detach(graph, site.op)[0]
                b.op("Add", scores, bias, out=y)
            report.replaced[kind] += 1
    dead_ops = set(dead)
    sweep(graph, reversed([op for op in graph.topo_order() if op in dead_ops]))
    return report


def _dtype(graph: Graph, op: Op) -> int:
    value = out(graph, op)
    return value.elem_type or onnx.TensorProto.FLOAT


# ---- finding the bias ------------------------------------------------------------------------

@dataclass
class _Inputs:
    """The graph inputs a mask is computed from, and how probes fill every input."""

    mask: Value | None
    tokens: Value | None
    positions: list[Value]
    past: list[Value]

    @classmethod
    def of(cls, graph: Graph) -> "_Inputs":
        live = [v for v in graph.inputs if v.const is None]
        ints = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL}
        mask = next((v for v in live if "mask" in v.name.lower() and v.elem_type in ints
                     and len(v.shape or ()) == 2), None)
        positions = [v for v in live if v.name in _POSITION_INPUTS]
        tokens = next((v for v in live if v.name in ("input_ids", "inputs_embeds")), None) or next(
            (v for v in live if v is not mask and v not in positions and v.elem_type in ints
             and len(v.shape or ()) == 2), None) or next(
            (v for v in live if v is not mask and v not in positions and len(v.shape or ()) in (2, 3)), None)
        past = [v for v in live if "past" in v.name.lower() and len(v.shape or ()) == 4]
        return cls(mask, tokens, positions, past)

    def value_readable(self) -> set[int]:
        """Inputs a mask may read by value (not only by shape)."""
        return {id(v) for v in ([self.mask] if self.mask is not None else []) + self.positions}


def _value_reads(graph: Graph, value: Value, allowed: set[int]) -> set[int] | None:
    """Graph inputs `value` reads by value (walking back, not into Shape/Size inputs); None as
    soon as the walk meets something a mask cannot read (an input outside `allowed`, a subgraph)."""
    found: set[int] = set()
    stack, seen = [value], set()
    graph_inputs = {id(v) for v in graph.inputs if v.const is None}
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen or graph.is_const(v):
            continue
        seen.add(id(v))
        if id(v) in graph_inputs:
            if id(v) not in allowed:
                return None
            found.add(id(v))
            continue
        op = graph.producer(v)
        if op is None or op.subgraphs:
            return None
        if op.op_type in ("Shape", "Size") and not op.domain:
            continue
        stack.extend(graph.inputs_of(op))
    return found


def _is_mask_source(graph: Graph, value: Value | None, inputs: _Inputs) -> bool:
    if value is None:
        return False
    reads = _value_reads(graph, value, inputs.value_readable())
    return reads is not None and (bool(reads) or not graph.is_const(value) or _static(inputs))


def _static(inputs: _Inputs) -> bool:
    shape = inputs.tokens.shape if inputs.tokens is not None else None
    return bool(shape) and all(isinstance(d, int) for d in shape[:2])


def _site(graph: Graph, softmax: Op, inputs: _Inputs) -> _Site | None:
    x = graph.inputs_of(softmax)[0]
    op = graph.producer(x) if x is not None else None
    if op is None or op.domain or (softmax.attr("axis", -1) not in (-1, len(x.shape or ()) - 1)):
        return None
    ins = graph.inputs_of(op)
    if op.op_type == "Add":
        found = [slot for slot in (0, 1) if _is_mask_source(graph, ins[slot], inputs)]
        if len(found) == 1:
            return _Site(op, ins[found[0]], slot=found[0])
    elif op.op_type == "Where" and len(ins) == 3:
        for scores_slot, fill_slot in ((1, 2), (2, 1)):
            fill = scalar(graph, ins[fill_slot])
            if fill is not None and fill <= MASKED and not graph.is_const(ins[scores_slot]) \
                    and _is_mask_source(graph, ins[0], inputs):
                return _Site(op, ins[0], where_allows=scores_slot == 1)
    return None


# ---- probing ---------------------------------------------------------------------------------

def _probe_sizes(inputs: _Inputs) -> list[tuple[int, int, int]] | None:
    """(batch, new tokens, past tokens) of every probe, within the inputs' static dims."""
    tokens = inputs.tokens.shape if inputs.tokens is not None else None
    if not tokens or len(tokens) < 2:
        return None
    sizes = [(1, 1, 0), (2, 5, 0), (3, 8, 0), (1, 6, 0)]
    if inputs.past:
        sizes += [(2, 1, 4), (2, 3, 5), (1, 4, 2)]
    fixed_b = tokens[0] if isinstance(tokens[0], int) else None
    fixed_s = tokens[1] if isinstance(tokens[1], int) else None
    mask_t = inputs.mask.shape[1] if inputs.mask is not None and inputs.mask.shape else None
    fixed_t = mask_t if isinstance(mask_t, int) else None
    out = []
    for b, s, p in sizes:
        b = fixed_b or b
        s = fixed_s or s
        if fixed_t is not None:
            p = fixed_t - s
            if p < 0 or (p and not inputs.past):
                return None
        out.append((b, s, p))
    return list(dict.fromkeys(out))


def _mask_rows(batch: int, total: int, side: str) -> np.ndarray:
    """Row b pads b keys (at least one row unpadded; batch 1 pads one key)."""
    mask = np.ones((batch, total), np.int64)
    if side == "none" or total < 2:
        return mask
    for b in range(batch):
        pad = min(total - 1, b if batch > 1 else 1)
        if pad:
            if side == "end":
                mask[b, total - pad:] = 0
            else:
                mask[b, :pad] = 0
    return mask


def _feeds(graph: Graph, needed: list[Value], inputs: _Inputs, b: int, s: int, p: int, side: str
           ) -> dict[str, np.ndarray] | None:
    t = p + s
    symbols: dict[str, int] = {}
    tok = inputs.tokens.shape
    for dim, size in ((tok[0], b), (tok[1], s)):
        if isinstance(dim, str):
            symbols[dim] = size
    if inputs.mask is not None and inputs.mask.shape and isinstance(inputs.mask.shape[1], str):
        symbols[inputs.mask.shape[1]] = t
    for v in inputs.past:
        if isinstance(v.shape[2], str):
            symbols.setdefault(v.shape[2], p)
    mask = _mask_rows(b, t, side)
    feeds = {}
    for v in needed:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.elem_type or onnx.TensorProto.FLOAT)
        if v is inputs.mask:
            feeds[v.name] = mask.astype(dtype)
            continue
        if v in inputs.positions:
            positions = np.arange(p, t, dtype=dtype)
            feeds[v.name] = positions if len(v.shape or ()) == 1 else np.broadcast_to(positions, (b, s)).copy()
            continue
        dims = []
        for dim in v.shape or ():
            size = dim if isinstance(dim, int) else symbols.get(dim)
            if size is None:
                return None
            dims.append(size)
        feeds[v.name] = np.zeros(dims, dtype)
    return feeds


def _allowed(kind: str, mask: np.ndarray, s: int) -> np.ndarray:
    """[B, 1, S, T] True where the canonical bias of `kind` is 0."""
    b, t = mask.shape
    padding = (mask != 0)[:, None, None, :]
    causal = (np.arange(t)[None, :] <= np.arange(t - s, t)[:, None])[None, None]
    allowed = {"key-padding": padding, "causal": causal, "causal+padding": padding & causal}[kind]
    return np.broadcast_to(allowed, (b, 1, s, t))


def _observed(result: np.ndarray, where: bool, allows: bool, b: int, s: int, t: int) -> np.ndarray | None:
    """[B, 1, S, T] True where the exporter's bias attends, or None when it is no mask."""
    result = np.asarray(result)
    if result.ndim > 4:
        return None
    result = result.reshape((1,) * (4 - result.ndim) + result.shape)
    if result.shape[0] not in (1, b) or result.shape[2] not in (1, s) or result.shape[3] != t:
        return None
    if where:
        attends = result.astype(bool) if allows else ~result.astype(bool)
    else:
        attends = result == 0
        if not np.all(attends | (result <= MASKED)):
            return None
    if np.any(attends != attends[:, :1]):
        return None  # differs across heads
    return np.broadcast_to(attends[:, :1], (b, 1, s, t))


def _recognise(graph: Graph, groups: list[list[_Site]], inputs: _Inputs) -> list[tuple[str | None, str]]:
    """(kind, "") or (None, why) for each group's source, all probed in one ONNX Runtime session
    (one source at a time when they cannot run together)."""
    sizes = _probe_sizes(inputs)
    if sizes is None:
        return [(None, "no token input to size probes by")] * len(groups)
    sources = [group[0].source for group in groups]
    cone = set().union(*(graph.ancestors(v) for v in sources))
    if any(op.subgraphs for op in cone) or len(groups) == 1:
        return [_probe(graph, [group], inputs, sizes)[0] for group in groups]
    results = _probe(graph, groups, inputs, sizes)
    if any(kind is None and why.startswith("ONNX Runtime") for kind, why in results):
        return [_probe(graph, [group], inputs, sizes)[0] for group in groups]
    return results


def _probe(graph: Graph, groups: list[list[_Site]], inputs: _Inputs, sizes: list[tuple[int, int, int]]
           ) -> list[tuple[str | None, str]]:
    sources = [group[0].source for group in groups]
    cone = set().union(*(graph.ancestors(v) for v in sources))
    if any(op.subgraphs for op in cone):
        return [(None, "its subgraph holds control flow")] * len(groups)
    upstream = {id(v) for source in sources for v in graph.upstream(source)}
    needed = [v for v in graph.inputs if v.const is None and id(v) in upstream]
    try:
        sess = session(sub_model(graph, cone, needed, sources))
    except Exception as err:  # noqa: BLE001 (ORT's pybind errors share no base class)
        return [(None, f"ONNX Runtime cannot run its subgraph: {type(err).__name__}")] * len(groups)
    candidates = [list(KINDS if inputs.mask is not None else ("causal",)) for _ in groups]
    why = [""] * len(groups)
    for b, s, p in sizes:
        for side in ("none", "end", "start"):
            feeds = _feeds(graph, needed, inputs, b, s, p, side)
            if feeds is None:
                return [(None, "an input it reads has a dim probes cannot size")] * len(groups)
            try:
                results = sess.run([v.name for v in sources], feeds)
            except Exception as err:  # noqa: BLE001
                return [(None, f"ONNX Runtime fails on a probe ({type(err).__name__})")] * len(groups)
            mask = feeds[inputs.mask.name] if inputs.mask is not None else np.ones((b, p + s), np.int64)
            for n, (group, result) in enumerate(zip(groups, results)):
                if not candidates[n]:
                    continue
                site = group[0]
                observed = _observed(result, site.op.op_type == "Where", site.where_allows, b, s, p + s)
                if observed is None:
                    candidates[n], why[n] = [], "its values or shape are not an attention mask's"
                    continue
                candidates[n] = [k for k in candidates[n] if np.array_equal(observed, _allowed(k, mask, s))]
                if not candidates[n]:
                    why[n] = "it matches no canonical mask on every probe"
    return [(kinds[0], "") if kinds else (None, reason) for kinds, reason in zip(candidates, why)]


# ---- the canonical subgraph ----------------------------------------------------------------

def _build(graph: Graph, kind: str, inputs: _Inputs, dtype: type) -> Value:
    anchor = min((op for v in (inputs.mask, inputs.tokens) if v is not None for op in graph.consumers(v)),
                 key=lambda op: op.order)
    b = Builder(graph, anchor, prefix="attention_mask_bias")
    if kind == "key-padding":
        return padding_bias(b, inputs.mask, dtype)
    total = inputs.mask if inputs.mask is not None else inputs.tokens
    if kind == "causal":
        return causal_bias(b, total, inputs.tokens, dtype)
    both = Value(graph.unique_name("attention_mask_bias"))
    return b.op("Add", padding_bias(b, inputs.mask, dtype), causal_bias(b, total, inputs.tokens, dtype), out=both)


def blocked_bias(b: Builder, allowed: Value, dtype: type, c: float, name: str) -> Value:
    """Mul(Sub(1, Cast(allowed)), c)."""
    as_float = b.op("Cast", allowed, to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    inverted = b.op("Sub", b.const("one", 1.0, dtype), as_float)
    return b.op("Mul", inverted, b.const("c", c, dtype), out=Value(b.graph.unique_name(name)))


def padding_bias(b: Builder, mask: Value, dtype: type = np.float32, c: float = C) -> Value:
    """[B, 1, 1, T]: Mul(Sub(1.0, Cast(Unsqueeze(mask, [1, 2]), to=FLOAT)), c)."""
    return blocked_bias(b, b.axes("Unsqueeze", mask, [1, 2]), dtype, c, "attention_mask_bias_padding")


def causal_bias(b: Builder, total_source: Value, new_source: Value, dtype: type = np.float32,
                c: float = C) -> Value:
    """[1, 1, S, T], T = dim 1 of `total_source`, S = dim 1 of `new_source`: key j attends to
    query i when j <= T - S + i."""
    one = b.const("one_i64", 1, np.int64)
    dim1 = b.const("dim1", 1, np.int64)
    total = b.op("Gather", b.op("Shape", total_source), dim1, axis=0)
    new = b.op("Gather", b.op("Shape", new_source), dim1, axis=0)
    keys = b.axes("Unsqueeze", b.op("Range", b.const("zero_i64", 0, np.int64), total, one), [0])
    queries = b.axes("Unsqueeze", b.op("Range", b.op("Sub", total, new), total, one), [1])
    allowed = b.axes("Unsqueeze", b.op("LessOrEqual", keys, queries), [0, 1])
    return blocked_bias(b, allowed, dtype, c, "attention_mask_bias_causal")


def canonical_kind(graph: Graph, value: Value | None) -> str | None:
    """Which canonical bias `value` is (by structure), or None."""
    op = graph.producer(value) if value is not None else None
    if op is None or op.domain:
        return None
    if op.op_type == "Add":
        kinds = {canonical_kind(graph, v) for v in graph.inputs_of(op)}
        return "causal+padding" if kinds == {"key-padding", "causal"} else None
    if op.op_type != "Mul" or scalar(graph, graph.inputs_of(op)[1]) != C:
        return None
    sub = graph.producer(graph.inputs_of(op)[0])
    if sub is None or sub.op_type != "Sub" or scalar(graph, graph.inputs_of(sub)[0]) != 1.0:
        return None
    cast = graph.producer(graph.inputs_of(sub)[1])
    unsqueeze = graph.producer(graph.inputs_of(cast)[0]) if cast is not None and cast.op_type == "Cast" else None
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
        return None
    source = graph.inputs_of(unsqueeze)[0]
    if any(v is source for v in graph.inputs):
        return "key-padding"
    inner = graph.producer(source)
    return "causal" if inner is not None and inner.op_type == "LessOrEqual" else None
