"""A compiled decoder laid out for ONNX Runtime's generation loop: the canonical forms every edgeq
pass and target matches, rewritten back into the fused kernels ONNX Runtime's CPU provider runs
at batch 1, where a decode step is otherwise thousands of tiny ops (SmolLM2 W4A16: 2410 nodes,
against 300 in onnxruntime-genai's own graph).

- An online Hadamard rotation on the last axis, `Einsum("...a,az->...z", x, H)` (the rotation pass
  writes Einsum to keep it out of quantization, which is over by now), becomes `MatMul(x, H)`:
  the same product, several times faster in ONNX Runtime; a chain of such products between
  Reshapes/Transposes of a last axis up to 1024 wide (a Kronecker Hadamard, a per-head rotation)
  becomes one MatMul by the dense product.
- RMSNorm `Mul(gamma, Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2)), eps)))))` (gamma may have
  been folded away) becomes ONNX Runtime's `SimplifiedLayerNormalization(x, gamma, epsilon)` (a
  kernel it registers in the ONNX domain, as onnxruntime-genai's builder writes it; the onnx
  checker does not know it, ONNX Runtime does).
- Attention with its cache (canonical: heads split, rotary, `present = Concat(past, new)`, the GQA
  repeat, `MatMul(q, k^T)`, one scale, the canonical causal+padding bias, Softmax, `MatMul(p, v)`,
  heads merged; a Hadamard on q and the same one on the repeated keys, which cancel in q k^T, may
  sit before the scores) becomes com.microsoft `GroupQueryAttention(q, k, v, past_key, past_value,
  seqlens_k, total_sequence_length, cos_cache, sin_cache)` with `do_rotary`: the cos/sin caches are
  the graph's own rotary tables, computed in ONNX Runtime for positions 0..context_length-1, and
  seqlens_k/total_sequence_length come from attention_mask as onnxruntime-genai's builder computes
  them. The cache keeps its layout (past + new, no shared buffer). A per-head rotation of the new
  values before the cache moves into the value input, or, with a float cache, past the attention
  onto each head's output, where it merges into the rotation before the output projection (the
  cache then holds the values before that rotation; only this graph reads them).
- The q, k and v projections of one input (MatMul by int4 DequantizeLinear weights) become one
  MatMul by the weights, scales and zero points concatenated along the output axis, the packed
  input GroupQueryAttention takes (one MatMulNBits instead of three).
- Other MatMuls of one input by weights of one format (a SwiGLU's gate and up projections) become
  one MatMul by the concatenated weights and a Split: one MatMulNBits instead of two a decode step,
  each output column computed as before.
- `SimplifiedLayerNormalization(Add(a, b))` becomes com.microsoft
  `SkipSimplifiedLayerNormalization(a, b, gamma)`, its 4th output the sum (the residual stream).

These are the layouts onnxruntime-genai's builder writes; a one-token decode step is launch-bound,
so every kernel fewer counts.

Each rewrite checks its whole pattern and leaves anything else as it is; the counts say what was
fused. Outputs match the unfused graph to float rounding (the tests generate with both; ONNX
Runtime's MatMulNBits rounds its inputs to int8 by default, which float rounding can tip).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

from edgeq.frontend.probing import Probe, ProbeError, run_probes
from edgeq.frontend.rules.base import scalar, sweep, sweep_dead
from edgeq.frontend.rules.mask import canonical_kind
from edgeq.ir import Graph, Op, Value

MS = "com.microsoft"


@dataclass
class FusionReport:
    fused: Counter = field(default_factory=Counter)
    left: Counter = field(default_factory=Counter)   # reason -> attention blocks left unfused

    def notes(self) -> list[str]:
        done = ", ".join(f"{n} {k}" for k, n in sorted(self.fused.items())) or "nothing"
        out = [f"fused for ONNX Runtime: {done}"]
        out += [f"attention left unfused ({n}): {reason}" for reason, n in sorted(self.left.items())]
        return out


def fuse_for_onnxruntime(graph: Graph, context_length: int) -> FusionReport:
    report = FusionReport()
    report.fused["Einsum -> MatMul"] = _einsum_to_matmul(graph)
    attention = _AttentionFusion(graph, context_length, report)
    attention.run()
    report.fused["RMSNorm -> SimplifiedLayerNormalization"] = _rms_norms(graph)
    report.fused["residual Add + RMSNorm -> SkipSimplifiedLayerNormalization"] = _skip_norms(graph)
    report.fused["MatMuls of one input (gate, up) -> one packed MatMul + Split"] = _pack_siblings(graph)
    report.fused["rotation chain -> one MatMul"] = _dense_chains(graph)
    merged, cancelled = _merge_products(graph)
    report.fused["consecutive rotations -> one MatMul"] = merged
    report.fused["a rotation and its inverse -> nothing"] = cancelled
    sweep_dead(graph)
    for value in list(graph.initializers):  # constants only the replaced ops read
        if not graph.consumers(value) and not graph.is_graph_output(value) and value not in graph.inputs:
            graph.remove_value(value)
    report.fused = Counter({k: v for k, v in report.fused.items() if v})
    return report


# ---- helpers -------------------------------------------------------------------------------------

def _const(graph: Graph, value: Value | None) -> np.ndarray | None:
    tensor = graph.constant(value) if value is not None else None
    return None if tensor is None else tensor.numpy()


def _producer(graph: Graph, value: Value | None, *types: str) -> Op | None:
    op = graph.producer(value) if value is not None else None
    return op if op is not None and not op.domain and op.op_type in types else None


def _only_consumer(graph: Graph, value: Value, *types: str) -> Op | None:
    readers = graph.consumers(value)
    if len(readers) != 1 or graph.is_graph_output(value):
        return None
    op = readers[0]
    return op if not op.domain and op.op_type in types else None


def _ints(graph: Graph, value: Value | None) -> list[int] | None:
    data = _const(graph, value)
    return None if data is None else [int(x) for x in data.reshape(-1)]


def _einsum_to_matmul(graph: Graph) -> int:
    count = 0
    for op in list(graph.ops()):
        if op.op_type != "Einsum" or op.domain or op.attr("equation") not in ("...a,az->...z", b"...a,az->...z"):
            continue
        x, h = graph.inputs_of(op)
        matrix = _const(graph, h)
        if matrix is None or matrix.ndim != 2:
            continue
        out = graph.outputs_of(op)[0]
        graph.remove_op(op, remove_outputs=False)
        graph.add_op("MatMul", [x, h], [out], name=op.name)
        count += 1
    return count


DENSE_CHAIN_MAX = 1024  # widest last axis whose chain of products becomes one dense [n, n] MatMul


def _dense_chains(graph: Graph) -> int:
    """`Reshape -> (MatMul by a constant, Transpose of the split axes)* -> Reshape` on the last
    axis of width n <= DENSE_CHAIN_MAX (an online Kronecker Hadamard, a per-head rotation) ->
    `MatMul(x, M)` with M the chain applied to the identity: one kernel instead of five to eight
    (a one-token decode step is launch-bound, and M stays in cache across the layers sharing it)."""
    count = 0
    shared: dict[bytes, Value] = {}
    for start in [op for op in graph.topo_order() if op.op_type == "Reshape" and not op.domain]:
        if start not in set(graph.ops()):
            continue
        chain = _chain_from(graph, start)
        if chain is None:
            continue
        x, ops, matrix = chain
        key = matrix.tobytes()
        if key not in shared:
            shared[key] = graph.add_constant(graph.unique_name(f"{start.name}/dense_rotation"), matrix)
        out = graph.outputs_of(ops[-1])[0]
        for op in reversed(ops):
            graph.remove_op(op, remove_outputs=op is not ops[-1])
        graph.add_op("MatMul", [x, shared[key]], [out], name=graph.unique_op_name(f"{start.name}/dense_rotation"))
        count += 1
    return count


# A merged product this close to the identity (float32 Hadamards times their transposes: ~1e-7)
# is dropped.
IDENTITY_TOLERANCE = 1e-5


def _merge_products(graph: Graph) -> tuple[int, int]:
    """MatMul(MatMul(x, A), B) with constant square A, B (the dense chains) -> MatMul(x, A B), or x
    where A B is the identity. Returns (merged, cancelled)."""
    count = cancelled = 0
    shared: dict[tuple[int, int], Value] = {}
    for op in [op for op in graph.topo_order() if op.op_type == "MatMul" and not op.domain]:
        if op not in set(graph.ops()):
            continue
        x, b_value = graph.inputs_of(op)
        first = _producer(graph, x, "MatMul")
        b = _const(graph, b_value)
        a = _const(graph, graph.inputs_of(first)[1]) if first is not None else None
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != a.shape[1] \
                or b.shape[0] != b.shape[1] or a.shape[0] > DENSE_CHAIN_MAX or _only_consumer(graph, x, "MatMul") is not op:
            continue
        key = (id(graph.inputs_of(first)[1]), id(b_value))
        source = graph.inputs_of(first)[0]
        product = (a.astype(np.float64) @ b.astype(np.float64))
        if np.abs(product - np.eye(len(product))).max() < IDENTITY_TOLERANCE \
                and not graph.is_graph_output(graph.outputs_of(op)[0]):
            # A rotation and its inverse (a value rotation moved past the attention, where no
            # online Hadamard follows): nothing left to compute.
            graph.replace_all_uses(graph.outputs_of(op)[0], source)
            graph.remove_op(op)
            graph.remove_op(first)
            cancelled += 1
            continue
        if key not in shared:
            shared[key] = graph.add_constant(graph.unique_name(f"{op.name}/merged_rotation"), product.astype(np.float32))
        graph.set_input(op, 0, source)
        graph.set_input(op, 1, shared[key])
        graph.remove_op(first)
        count += 1
    return count, cancelled


def _chain_from(graph: Graph, start: Op) -> tuple[Value, list[Op], np.ndarray] | None:
    x = graph.inputs_of(start)[0]
    width = x.shape[-1] if x is not None and x.shape else None
    if not isinstance(width, int) or width > DENSE_CHAIN_MAX:
        return None
    rank = len(x.shape)
    lead = rank - 1
    ops, op, products = [], start, 0
    identity = np.eye(width, dtype=np.float64)  # rows: a batch of `width` inputs through the chain
    y = identity
    while True:
        if op.op_type == "Reshape":
            shape = _ints(graph, graph.inputs_of(op)[1])
            if shape is None or len(shape) < lead or any(d != 0 for d in shape[:lead]) or \
                    any(d <= 0 for d in shape[lead:]):
                return None
            y = y.reshape([width, *shape[lead:]])
        elif op.op_type == "Transpose":
            perm = list(op.attr("perm") or [])
            if len(perm) < lead or perm[:lead] != list(range(lead)):
                return None
            y = y.transpose([0, *[p - lead + 1 for p in perm[lead:]]])
        elif op.op_type in ("MatMul", "Einsum"):
            if op.op_type == "Einsum" and op.attr("equation") not in ("...a,az->...z", b"...a,az->...z"):
                return None
            matrix = _const(graph, graph.inputs_of(op)[1])
            if matrix is None or matrix.ndim != 2 or y.ndim < 2 or matrix.shape[0] != y.shape[-1]:
                return None
            y = y @ matrix
            products += 1
        else:
            return None
        ops.append(op)
        out = graph.outputs_of(op)[0]
        if op is not start and op.op_type == "Reshape" and y.ndim == 2 and y.shape[1] == width:
            break
        nxt = _only_consumer(graph, out, "Reshape", "Transpose", "MatMul", "Einsum")
        if nxt is None or graph.inputs_of(nxt)[0] is not out:
            return None
        op = nxt
    if products == 0 or len(ops) < 3:
        return None
    return x, ops, y.astype(np.float32)


def _rms_norms(graph: Graph) -> int:
    """Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2), [-1]), eps))) read by Mul(x, .) [then Mul(gamma, .)]."""
    count = 0
    for recip in [op for op in graph.ops() if op.op_type == "Reciprocal" and not op.domain]:
        sqrt = _producer(graph, graph.inputs_of(recip)[0], "Sqrt")
        add = _producer(graph, graph.inputs_of(sqrt)[0], "Add") if sqrt else None
        if add is None:
            continue
        ins = graph.inputs_of(add)
        mean_in = next((v for v in ins if _producer(graph, v, "ReduceMean")), None)
        eps = next((scalar(graph, v) for v in ins if v is not mean_in), None)
        mean = _producer(graph, mean_in, "ReduceMean")
        if mean is None or eps is None or _reduce_axes(graph, mean) not in ([-1],) or not mean.attr("keepdims", 1):
            continue
        power = _producer(graph, graph.inputs_of(mean)[0], "Pow")
        if power is None or scalar(graph, graph.inputs_of(power)[1]) != 2.0:
            continue
        x = graph.inputs_of(power)[0]
        scale = _only_consumer(graph, graph.outputs_of(recip)[0], "Mul")
        if scale is None or x not in graph.inputs_of(scale):
            continue
        normed = graph.outputs_of(scale)[0]
        gain = _only_consumer(graph, normed, "Mul")
        gamma_value = next((v for v in graph.inputs_of(gain) if v is not normed), None) if gain else None
        gamma = _const(graph, gamma_value)
        width = x.shape[-1] if x.shape else None
        if gamma is not None and gamma.size == width and gamma.ndim <= 1:
            out, matched = graph.outputs_of(gain)[0], [gain, scale]
        elif isinstance(width, int):
            out, matched = normed, [scale]
            gamma_value = graph.add_constant(graph.unique_name(f"{scale.name}/gamma"), np.ones(width, np.float32))
        else:
            continue
        for op in matched:
            graph.remove_op(op, remove_outputs=False)
        # ONNX Runtime registers this kernel in the ONNX domain (opset 1), as the builder writes it.
        graph.add_op("SimplifiedLayerNormalization", [x, gamma_value], [out], domain="",
                     name=graph.unique_op_name(f"{recip.name}/SimplifiedLayerNormalization"),
                     attrs={"axis": -1, "epsilon": float(eps), "stash_type": 1})
        sweep(graph, [recip, sqrt, add, mean, power])
        count += 1
    return count


def _skip_norms(graph: Graph) -> int:
    """SimplifiedLayerNormalization(Add(a, b)) -> com.microsoft SkipSimplifiedLayerNormalization(a,
    b, gamma), whose 4th output is the sum (the residual stream the next layer adds to), as
    onnxruntime-genai's builder writes it: one kernel instead of two per norm."""
    count = 0
    for norm in [op for op in graph.topo_order() if op.op_type == "SimplifiedLayerNormalization" and not op.domain]:
        x, gamma = graph.inputs_of(norm)[:2]
        add = _producer(graph, x, "Add")
        if add is None or len(graph.outputs_of(norm)) != 1:
            continue
        a, b = graph.inputs_of(add)
        if not _same_activation_shape([a.shape, b.shape, x.shape]) or any(graph.is_const(v) for v in (a, b)):
            continue
        (out,) = graph.outputs_of(norm)
        epsilon = norm.attr("epsilon", 1e-5)
        graph.remove_op(norm, remove_outputs=False)
        graph.remove_op(add, remove_outputs=False)
        unused = [Value(graph.unique_name(f"{out.name}/unused{i}")) for i in (1, 2)]
        graph.add_op("SkipSimplifiedLayerNormalization", [a, b, gamma], [out, *unused, x], domain=MS,
                             name=graph.unique_op_name(f"{norm.name}/Skip"), attrs={"epsilon": float(epsilon)})
        for value in unused:  # optional outputs 1-2 (mean, inverse std) omitted: written as ""
            graph.remove_value(value)
        _import_ms(graph)
        count += 1
    return count


def _same_activation_shape(shapes: list) -> bool:
    """[batch, sequence, width] alike: the same int width, and no axis of 1 in one shape where
    another has something else (no broadcasting; symbolic names may differ where inference lost
    that two are equal)."""
    if any(not s or len(s) != 3 for s in shapes) or not isinstance(shapes[0][2], int) or \
            len({s[2] for s in shapes}) != 1:
        return False
    return all(len({d for d in dims}) == 1 or 1 not in dims for dims in zip(*(s[:2] for s in shapes)))


def _is_float(value: Value) -> bool:
    return value.elem_type in (None, onnx.TensorProto.FLOAT)


def _pack_projections(graph: Graph, gqa: Op) -> bool:
    """GroupQueryAttention's packed input for q, k, v (its inputs 0-2), where each is MatMul(x, W)
    of the same x, read by nothing else, and W constant or DequantizeLinear of constants with the
    same attributes (int4 blocks along the input axis): the weights, scales and zero points
    concatenated along the output axis, so ONNX Runtime runs one MatMulNBits where it ran three."""
    values = graph.inputs_of(gqa)[:3]
    producers = [_producer(graph, v, "MatMul") for v in values]
    if any(p is None or graph.consumers(v) != [gqa] or graph.is_graph_output(v) for p, v in zip(producers, values)):
        return False
    packed = _packed_matmul(graph, producers, "/gqa/packed_qkv", keep_outputs=True)
    if packed is None:
        return False
    graph.set_input(gqa, 0, packed)
    graph.set_input(gqa, 1, None)
    graph.set_input(gqa, 2, None)
    for value in values:
        graph.remove_value(value)
    return True


def _pack_siblings(graph: Graph) -> int:
    """MatMuls of one input by weights of one format (a SwiGLU's gate and up projections) become
    one MatMul by the concatenated weights and a Split along the last axis: one MatMulNBits
    instead of several. Each output column is computed as before (same input blocks, same
    weights), so the outputs are the same."""
    groups: dict[str, list[Op]] = {}
    for op in graph.ops_of_type("MatMul"):
        x = graph.inputs_of(op)[0]
        if not op.domain and x is not None:
            groups.setdefault(x.name, []).append(op)
    packed = 0
    for siblings in groups.values():
        if len(siblings) < 2:
            continue
        widths = [_output_width(graph, op) for op in siblings]
        if any(w is None for w in widths):
            continue
        outputs = [graph.outputs_of(op)[0] for op in siblings]
        value = _packed_matmul(graph, sorted(siblings, key=lambda op: op.order), "/packed_siblings",
                               keep_outputs=True)
        if value is None:
            continue
        split = graph.add_constant(graph.unique_name("/packed_siblings/split"), np.asarray(widths, np.int64))
        graph.add_op("Split", [value, split], outputs, name=graph.unique_op_name("/packed_siblings/Split"),
                     attrs={"axis": -1}, after=graph.producer(value))
        packed += 1
    return packed


def _output_width(graph: Graph, matmul: Op) -> int | None:
    """The output width of MatMul(x, W) with W [K, N] constant or DequantizeLinear of a constant."""
    weight = graph.inputs_of(matmul)[1]
    dequantize = _producer(graph, weight, "DequantizeLinear")
    array = _const(graph, graph.inputs_of(dequantize)[0] if dequantize is not None else weight)
    return int(array.shape[1]) if array is not None and array.ndim == 2 else None


def _packed_matmul(graph: Graph, producers: list[Op], label: str, *, keep_outputs: bool = False) -> Value | None:
    """One MatMul(x, W_1 | W_2 | ...) for MatMul(x, W_i) of the same x, with each W_i constant or
    DequantizeLinear of constants with the same attributes (blocks along the input axis, or per
    output channel), read by nothing else: the weights, scales and zero points concatenated along
    the output axis. The MatMuls are removed (their outputs too unless `keep_outputs`); the
    packed product is returned, or None (graph unchanged) where the weights do not pack."""
    sources = {id(graph.inputs_of(p)[0]) for p in producers}
    if len(sources) != 1:
        return None
    x = graph.inputs_of(producers[0])[0]
    weights = [graph.inputs_of(p)[1] for p in producers]
    dequantize = [_producer(graph, w, "DequantizeLinear") for w in weights]
    if all(d is None for d in dequantize):
        arrays = [_const(graph, w) for w in weights]
        if any(a is None or a.ndim != 2 for a in arrays) or len({a.shape[0] for a in arrays}) != 1 \
                or len({a.dtype for a in arrays}) != 1 or any(len(graph.consumers(w)) != 1 for w in weights):
            return None
        packed_weight = graph.add_constant(graph.unique_name(f"{weights[0].name}{label}"),
                                           np.concatenate(arrays, axis=1))
    elif all(d is not None for d in dequantize):
        attrs = [(d.attr("axis", 1), d.attr("block_size", 0), d.attr("output_dtype", 0)) for d in dequantize]
        inputs = [graph.inputs_of(d) for d in dequantize]
        if len(set(attrs)) != 1 or len({len(i) for i in inputs}) != 1 or \
                any(len(graph.consumers(w)) != 1 for w in weights):
            return None
        axis, block = attrs[0][:2]
        if axis not in ((0, -2) if block else (1, -1)):  # blocks along the input axis, or per output channel
            return None
        parts = []
        for slot in range(len(inputs[0])):
            arrays = [_const(graph, i[slot]) if i[slot] is not None else None for i in inputs]
            if any(a is None for a in arrays) or len({(a.dtype, a.ndim) for a in arrays}) != 1:
                return None
            ndim = arrays[0].ndim
            if ndim == 0 and slot > 0:  # one scale/zero point for all: the same for every part
                if len({a.tobytes() for a in arrays}) != 1:
                    return None
                parts.append(arrays[0])
                continue
            if ndim not in (1, 2) or (ndim == 1 and (slot == 0 or block)) or \
                    (ndim == 2 and len({a.shape[0] for a in arrays}) != 1):
                return None
            parts.append(np.concatenate(arrays, axis=ndim - 1))  # along the output axis
        consts = [graph.add_constant(graph.unique_name(f"{inputs[0][slot].name}{label}"), a)
                  for slot, a in enumerate(parts)]
        node = graph.add_op("DequantizeLinear", consts, 1, name=graph.unique_op_name(f"{label}/DequantizeLinear"),
                            attrs={k: v for k, v in (("axis", axis), ("block_size", block),
                                                     ("output_dtype", attrs[0][2])) if v or k == "axis"})
        packed_weight = graph.outputs_of(node)[0]
    else:
        return None
    node = graph.add_op("MatMul", [x, packed_weight], 1, name=graph.unique_op_name(f"{label}/MatMul"),
                        before=producers[0])
    for p in producers:
        graph.remove_op(p, remove_outputs=not keep_outputs)
    sweep(graph, [d for d in dequantize if d is not None])
    return graph.outputs_of(node)[0]


def _reduce_axes(graph: Graph, op: Op) -> list[int] | None:
    ins = graph.inputs_of(op)
    if len(ins) > 1 and ins[1] is not None:
        return _ints(graph, ins[1])
    axes = op.attr("axes")
    return None if axes is None else [int(a) for a in axes]


def _import_ms(graph: Graph) -> None:
    if graph.model is not None and MS not in graph.model.opset_imports:
        graph.model.opset_imports[MS] = 1


# ---- attention -----------------------------------------------------------------------------------

@dataclass
class _Heads:
    """x [B, S, heads * d] split as Transpose(Reshape(x, [0, 0, heads, d]), [0, 2, 1, 3])."""

    source: Value
    heads: int
    d: int
    ops: list[Op]


@dataclass
class _Block:
    q: _Heads
    k: _Heads
    v: _Heads
    past_key: Value
    past_value: Value
    present_key: Value
    present_value: Value
    cos: Value
    sin: Value
    scale: float
    out: Value
    ops: list[Op]
    v_matrix: np.ndarray | None = None   # a per-head [d, d] product on the new values before the cache


class _AttentionFusion:
    def __init__(self, graph: Graph, context_length: int, report: FusionReport):
        self.graph = graph
        self.context_length = context_length
        self.report = report
        live = [v for v in graph.inputs if v.const is None]
        self.mask = next((v for v in live if v.name == "attention_mask"), None)
        self.tokens = next((v for v in live if v.name == "input_ids"), None)
        self._tables: dict[tuple[str, str], tuple[Value, Value]] = {}
        self._lengths: tuple[Value, Value] | None = None
        self._rotations: dict[bytes, Value] = {}
        self._value_rotations = 0

    def run(self) -> None:
        if self.mask is None or self.tokens is None:
            return
        blocks = []
        for softmax in [op for op in self.graph.ops() if op.op_type == "Softmax" and not op.domain]:
            block = self._match(softmax)
            if isinstance(block, str):
                self.report.left[block] += 1
            else:
                blocks.append(block)
        for block in blocks:
            try:
                cos, sin = self._tables_for(block)
            except ProbeError as err:
                self.report.left[f"rotary tables not computable ({err.problem[:80]})"] += 1
                continue
            self._rewrite(block, cos, sin)
            self.report.fused["attention -> GroupQueryAttention"] += 1
        if self._value_rotations:
            self.report.fused["value rotations moved past the attention (cache holds rotated values)"] = \
                self._value_rotations

    # ---- matching ----------------------------------------------------------------------------

    def _match(self, softmax: Op) -> _Block | str:
        g = self.graph
        if softmax.attr("axis", -1) not in (-1, 3):
            return "softmax not over the keys"
        add = _producer(g, graph_in(g, softmax), "Add")
        if add is None:
            return "no additive mask before the softmax"
        bias = next((v for v in g.inputs_of(add) if canonical_kind(g, v) in ("causal+padding", "causal")), None)
        if bias is None:
            return "the mask bias is not the canonical causal one"
        scaled = next(v for v in g.inputs_of(add) if v is not bias)
        mul = _producer(g, scaled, "Mul")
        scores = scale = None
        if mul is not None:
            for a, b in (g.inputs_of(mul), reversed(g.inputs_of(mul))):
                if scalar(g, b) is not None:
                    scores, scale = a, scalar(g, b)
        qk = _producer(g, scores, "MatMul")
        if qk is None:
            return "no scaled q k^T before the softmax"
        q_in, kt = g.inputs_of(qk)
        transpose = _producer(g, kt, "Transpose")
        if transpose is None or list(transpose.attr("perm") or []) != [0, 1, 3, 2]:
            return "keys not transposed as [0, 1, 3, 2]"
        q_rot, h_q, q_h_op = self._hadamard(q_in)
        k_rep, h_k, k_h_op = self._hadamard(g.inputs_of(transpose)[0])
        if (h_q is None) != (h_k is None) or (h_q is not None and not np.allclose(h_q, h_k, atol=1e-6)):
            return "q and k rotated differently"
        k_cat, k_repeat_ops, n_rep = self._unrepeat(k_rep)
        pv = _only_consumer(g, g.outputs_of(softmax)[0], "MatMul")
        if pv is None or g.inputs_of(pv)[0] is not g.outputs_of(softmax)[0]:
            return "no p v after the softmax"
        v_cat, v_repeat_ops, n_rep_v = self._unrepeat(g.inputs_of(pv)[1])
        if n_rep != n_rep_v:
            return "keys and values repeated differently"
        merged = self._merge(g.outputs_of(pv)[0])
        if merged is None:
            return "heads not merged as Reshape(Transpose(x, [0, 2, 1, 3]), [0, 0, H*d])"
        out, merge_ops = merged
        k_concat, v_concat = _producer(g, k_cat, "Concat"), _producer(g, v_cat, "Concat")
        if k_concat is None or v_concat is None:
            return "no Concat(past, new) cache"
        caches = []
        for concat in (k_concat, v_concat):
            past, new = (g.inputs_of(concat) + [None, None])[:2]
            if concat.attr("axis") not in (2, -2) or len(g.inputs_of(concat)) != 2 or past not in g.inputs \
                    or not g.is_graph_output(g.outputs_of(concat)[0]):
                return "the cache is not present = Concat(past input, new, axis=2) as a graph output"
            caches.append((past, new))
        (past_k, k_new), (past_v, v_new) = caches
        # A per-head rotation of the new values before the cache (the rotation pass's fold through
        # the cache) goes with them into GroupQueryAttention's value input.
        v_new, v_matrix, v_op = self._hadamard(v_new)
        q_rotary = self._rotary(q_rot)
        k_rotary = self._rotary(k_new)
        if q_rotary is None or k_rotary is None:
            return "rotary not in the canonical rotate-half form"
        (q_heads_value, cos, sin, q_rot_ops), (k_heads_value, cos_k, sin_k, k_rot_ops) = q_rotary, k_rotary
        if cos is not cos_k or sin is not sin_k:
            return "q and k rotated with different tables"
        q, k, v = self._heads(q_heads_value), self._heads(k_heads_value), self._heads(v_new)
        if q is None or k is None or v is None:
            return "heads not split as Transpose(Reshape(x, [0, 0, H, d]), [0, 2, 1, 3])"
        if k.heads != v.heads or q.heads != k.heads * n_rep or not (q.d == k.d == v.d) or q.d % 16:
            return "head counts/sizes ONNX Runtime's GroupQueryAttention does not take"
        if scale is None:
            return "no single scale on the scores"
        ops = [softmax, add, mul, qk, transpose, pv, k_concat, v_concat, *merge_ops, *k_repeat_ops, *v_repeat_ops,
               *q_rot_ops, *k_rot_ops, *[op for op in (q_h_op, k_h_op, v_op) if op is not None]]
        return _Block(q, k, v, past_k, past_v, g.outputs_of(k_concat)[0], g.outputs_of(v_concat)[0], cos, sin,
                      scale, out, ops, v_matrix)

    def _hadamard(self, value: Value) -> tuple[Value, np.ndarray | None, Op | None]:
        op = _producer(self.graph, value, "MatMul", "Einsum")
        if op is None:
            return value, None, None
        x, h = self.graph.inputs_of(op)[:2]
        matrix = _const(self.graph, h)
        if matrix is None or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] \
                or not np.allclose(matrix @ matrix.T, np.eye(len(matrix)), atol=1e-4):
            return value, None, None
        return x, matrix, op

    def _unrepeat(self, value: Value) -> tuple[Value, list[Op], int]:
        g = self.graph
        reshape = _producer(g, value, "Reshape")
        expand = _producer(g, g.inputs_of(reshape)[0], "Expand") if reshape else None
        unsqueeze = _producer(g, g.inputs_of(expand)[0], "Unsqueeze") if expand else None
        if unsqueeze is None:
            return value, [], 1
        reps = _ints(g, g.inputs_of(expand)[1])
        if reps is None or len(reps) != 5:
            return value, [], 1
        return g.inputs_of(unsqueeze)[0], [reshape, expand, unsqueeze], reps[2]

    def _merge(self, value: Value) -> tuple[Value, list[Op]] | None:
        g = self.graph
        transpose = _only_consumer(g, value, "Transpose")
        if transpose is None or list(transpose.attr("perm") or []) != [0, 2, 1, 3]:
            return None
        reshape = _only_consumer(g, g.outputs_of(transpose)[0], "Reshape")
        shape = _ints(g, g.inputs_of(reshape)[1]) if reshape else None
        if shape is None or len(shape) != 3 or shape[:2] != [0, 0]:
            return None
        return g.outputs_of(reshape)[0], [transpose, reshape]

    def _rotary(self, value: Value) -> tuple[Value, Value, Value, list[Op]] | None:
        """Add(Mul(x, cos), Mul(Concat(Neg(Slice(x, half:)), Slice(x, :half)), sin))."""
        g = self.graph
        add = _producer(g, value, "Add")
        if add is None:
            return None
        for first, second in (g.inputs_of(add), reversed(g.inputs_of(add))):
            plain, rotated = _producer(g, first, "Mul"), _producer(g, second, "Mul")
            if plain is None or rotated is None:
                continue
            for concat_in, sin in (g.inputs_of(rotated), reversed(g.inputs_of(rotated))):
                concat = _producer(g, concat_in, "Concat")
                if concat is None or len(g.inputs_of(concat)) != 2:
                    continue
                neg = _producer(g, g.inputs_of(concat)[0], "Neg")
                low = _producer(g, g.inputs_of(concat)[1], "Slice")
                high = _producer(g, g.inputs_of(neg)[0], "Slice") if neg else None
                if high is None or low is None or g.inputs_of(high)[0] is not g.inputs_of(low)[0]:
                    continue
                x = g.inputs_of(low)[0]
                if x not in g.inputs_of(plain):
                    continue
                cos = next(v for v in g.inputs_of(plain) if v is not x)
                return x, cos, sin, [add, plain, rotated, concat, neg, low, high]
        return None

    def _heads(self, value: Value) -> _Heads | None:
        g = self.graph
        transpose = _producer(g, value, "Transpose")
        if transpose is None or list(transpose.attr("perm") or []) != [0, 2, 1, 3]:
            return None
        reshape = _producer(g, g.inputs_of(transpose)[0], "Reshape")
        shape = _ints(g, g.inputs_of(reshape)[1]) if reshape else None
        if shape is None or len(shape) != 4 or shape[:2] != [0, 0] or min(shape[2:]) <= 0:
            return None
        return _Heads(g.inputs_of(reshape)[0], shape[2], shape[3], [transpose, reshape])

    # ---- rewriting ---------------------------------------------------------------------------

    def _tables_for(self, block: _Block) -> tuple[Value, Value]:
        """cos/sin caches [context_length, d/2] from the graph's own tables at positions 0.."""
        key = (block.cos.name, block.sin.name)
        if key in self._tables:
            return self._tables[key]
        g, length = self.graph, self.context_length
        feeds = {}
        for value in g.inputs:
            if value.const is not None:
                continue
            dims = value.shape or ()
            if value is self.mask or value is self.tokens:
                feeds[value.name] = np.ones((1, length), np.int64)
            elif value.name == "position_ids":
                feeds[value.name] = np.arange(length, dtype=np.int64)[None, :]
            elif len(dims) == 4:
                feeds[value.name] = np.zeros([1, dims[1], 0, dims[3]], onnx.helper.tensor_dtype_to_np_dtype(value.elem_type))
        for value in (block.cos, block.sin):
            if value.elem_type is None:  # rotary tables are float; ORT needs the output's type
                value.set_type(onnx.TensorProto.FLOAT, None)
        (_, values), = run_probes(g, [Probe({}, feeds)], values_of=[block.cos, block.sin])
        tables = []
        half = block.q.d // 2
        for value, name in ((block.cos, "cos_cache"), (block.sin, "sin_cache")):
            full = np.asarray(values[value.name], np.float32).reshape(length, -1)
            if full.shape[1] != block.q.d or not np.allclose(full[:, :half], full[:, half:]):
                raise ProbeError("the rotary tables are not [positions, d] in rotate-half layout")
            tables.append(g.add_constant(g.unique_name(f"/gqa/{name}"), np.ascontiguousarray(full[:, :half])))
        self._tables[key] = (tables[0], tables[1])
        return self._tables[key]

    def _sequence_lengths(self) -> tuple[Value, Value]:
        """seqlens_k = ReduceSum(mask, 1) - 1 and total_sequence_length = dim 1 of the mask, int32."""
        if self._lengths is None:
            g = self.graph
            one = g.add_constant(g.unique_name("/gqa/one"), np.array([1], np.int64))
            one_s = g.add_constant(g.unique_name("/gqa/one_scalar"), np.array(1, np.int64))

            def op(op_type, *inputs, **attrs):
                node = g.add_op(op_type, list(inputs), 1, name=g.unique_op_name(f"/gqa/{op_type}"), attrs=attrs or None)
                return g.outputs_of(node)[0]

            total_per_row = op("ReduceSum", self.mask, one, keepdims=0)
            seqlens = op("Cast", op("Sub", total_per_row, one), to=onnx.TensorProto.INT32)
            total = op("Cast", op("Gather", op("Shape", self.mask), one_s, axis=0), to=onnx.TensorProto.INT32)
            self._lengths = (seqlens, total)
        return self._lengths

    def _rewrite(self, block: _Block, cos: Value, sin: Value) -> None:
        g = self.graph
        seqlens, total = self._sequence_lengths()
        outs = [block.out, block.present_key, block.present_value]
        for value in outs:
            producer = g.producer(value)
            g.remove_op(producer, remove_outputs=False)
        value_input, rotate_out = block.v.source, None
        if block.v_matrix is not None:
            matrix = block.v_matrix.astype(np.float32)
            if _is_float(block.past_value):
                # A float cache may hold the values unrotated (only this graph reads its cache): the
                # per-head product moves past the attention (softmax weights mix tokens, not
                # channels), onto each query head's output, where it merges with the rotation
                # before the output projection (_merge_products), and q, k, v can be packed.
                self._value_rotations += 1
                rotate_out = self._rotation(np.kron(np.eye(block.q.heads, dtype=np.float32), matrix))
                outs[0] = g.unique_name(f"{block.out.name}/unrotated")
            else:  # per head x M before the cache: one MatMul by the block diagonal I (x) M
                rotation = self._rotation(np.kron(np.eye(block.v.heads, dtype=np.float32), matrix))
                node = g.add_op("MatMul", [block.v.source, rotation], 1, name=g.unique_op_name("/gqa/v_rotation"))
                value_input = g.outputs_of(node)[0]
        gqa = g.add_op("GroupQueryAttention", [block.q.source, block.k.source, value_input, block.past_key,
                                               block.past_value, seqlens, total, cos, sin], outs, domain=MS,
                       name=g.unique_op_name("/gqa/GroupQueryAttention"),
                       attrs={"num_heads": block.q.heads, "kv_num_heads": block.k.heads, "scale": float(block.scale),
                              "do_rotary": 1, "rotary_interleaved": 0})
        if rotate_out is not None:
            g.add_op("MatMul", [g.outputs_of(gqa)[0], rotate_out], [block.out], name=g.unique_op_name("/gqa/v_rotation"))
        _import_ms(g)
        sweep(g, [op for op in block.ops + block.q.ops + block.k.ops + block.v.ops if op in set(g.ops())])
        if _pack_projections(g, gqa):
            self.report.fused["q, k, v projections -> one packed MatMul"] += 1

    def _rotation(self, matrix: np.ndarray) -> Value:
        key = matrix.tobytes()
        if key not in self._rotations:
            self._rotations[key] = self.graph.add_constant(self.graph.unique_name("/gqa/v_rotation"), matrix)
        return self._rotations[key]


def graph_in(graph: Graph, op: Op) -> Value:
    return graph.inputs_of(op)[0]
