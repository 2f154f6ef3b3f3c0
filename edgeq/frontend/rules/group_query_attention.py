"""com.microsoft `GroupQueryAttention` (onnxruntime-genai's builder writes one per layer) -> the
canonical attention core with a KV cache (canonical.md item 5).

    GroupQueryAttention(query[, key, value], past_key, past_value, seqlens_k, total_sequence_length,
                        cos_cache?, sin_cache?) -> output, present_key, present_value

becomes, for each layer:
- q/k/v: a packed query (key and value omitted) whose producer is `MatMul(x, W)` with a constant
  W read only here is split into three linears `MatMul(x, W_q|W_k|W_v)` (so the linears are the
  model's own q/k/v projections); otherwise three `Slice`s of it;
- heads split `Transpose(Reshape(x, [0, 0, H, d]), [0, 2, 1, 3])`;
- rotary (`do_rotary`, HF's rotate-half layout) with `cos = Concat(c, c)` and `c` rows T - S .. T - 1
  of cos_cache (a Slice; T = dim 1 of attention_mask, S = new tokens), shared by every layer:
  `Add(Mul(x, cos), Mul(Concat(Neg(Slice(x, half:)), Slice(x, :half)), sin))`;
- `present = Concat(past, new, axis=2)` for keys (after rotary) and values;
- the GQA repeat `Reshape(Expand(Unsqueeze(k, [2]), [1, 1, n_rep, 1, 1]), [0, H, -1, d])`;
- `MatMul(q, Transpose(k, [0, 1, 3, 2]))`, one `Mul` by the scale, `Add` of the canonical
  causal+padding bias built from the graph's attention_mask and input_ids (shared by every
  layer), `Softmax`, `MatMul(probs, v)`, heads merged `Reshape(Transpose(x, [0, 2, 1, 3]), [0, 0, H*d])`.

The op reads its cache as past + new (the layout of a graph whose cache grows by concatenation):
a generation loop must feed it without a shared past/present buffer (onnxruntime-genai's
`past_present_share_buffer` false, which `edgeq package --genai` writes). seqlens_k and
total_sequence_length are not read any more (their subgraph dies). The cache inputs and outputs
get the static head size the op implies.

Refused, with the reason: a quantized cache (k/v_quant_type, integer past), a local window,
softcap, smooth softmax, head sinks, an attention bias or position_ids input, the qk output,
interleaved rotary, a model without a 2-D attention_mask and input_ids input.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from edgeq.frontend.rules.base import Builder, Match, Rule, array, detach, opset, owned
from edgeq.frontend.rules.mask import causal_bias, padding_bias
from edgeq.ir import Graph, Op, Value

MS = "com.microsoft"
MASK_BIAS = "/gqa/attention_mask_bias"
ROTARY = "/gqa/rotary"


def _inputs(graph: Graph) -> tuple[Value | None, Value | None]:
    """The graph's 2-D integer attention mask and its token input."""
    live = [v for v in graph.inputs if v.const is None and v.shape is not None]
    ints = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
    mask = next((v for v in live if "mask" in v.name.lower() and len(v.shape) == 2 and v.elem_type in ints), None)
    tokens = next((v for v in live if v.name in ("input_ids", "inputs_embeds")), None)
    return mask, tokens


class GroupQueryAttention(Rule):
    name = "group-query-attention"
    roots = frozenset({f"{MS}::GroupQueryAttention"})

    def match(self, graph: Graph, op: Op) -> Match | None:
        ins = graph.inputs_of(op) + [None] * 16
        outs = graph.outputs_of(op) + [None] * 4
        # The packed projection goes with the op when it is split into three linears (sweep
        # removes it once nothing reads it).
        packed = graph.producer(ins[0]) if ins[0] is not None and ins[1] is None else None
        ops = [op] + ([packed] if packed is not None and packed.op_type == "MatMul" and not packed.domain else [])
        return Match(op, ops, {"query": ins[0], "key": ins[1], "value": ins[2], "past_key": ins[3],
                                "past_value": ins[4], "cos": ins[7], "sin": ins[8], "y": outs[0],
                                "present_key": outs[1], "present_value": outs[2]},
                     {"unsupported_inputs": [v for v in ins[9:16] if v is not None], "qk": outs[3]})

    def check(self, graph: Graph, match: Match) -> str | None:
        op = match.root
        for attr, default in (("k_quant_type", "NONE"), ("v_quant_type", "NONE")):
            value = op.attr(attr, default)
            if (value.decode() if isinstance(value, bytes) else value) != "NONE":
                return "a quantized cache is not decomposed"
        refusals = {"local_window_size": (-1, "a local attention window"), "softcap": (0.0, "softcap"),
                    "smooth_softmax": (0, "smooth softmax"), "rotary_interleaved": (0, "interleaved rotary"),
                    "qk_output": (0, "the qk output")}
        for attr, (default, what) in refusals.items():
            if op.attr(attr, default) not in (default, None):
                return f"{what} is not decomposed yet"
        if match.params["unsupported_inputs"]:
            return "position_ids, attention_bias, head_sink or scale inputs are not decomposed yet"
        if match.params["qk"] is not None and graph.consumers(match.params["qk"]):
            return "the qk output is not decomposed yet"
        if match["past_key"] is None or match["past_value"] is None:
            return "a GroupQueryAttention without past key/value inputs is not decomposed yet"
        if any(v is not None and v.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
               for v in (match["past_key"], match["past_value"])):
            return "a quantized cache is not decomposed"
        if _sizes(graph, match) is None:
            return "num_heads / kv_num_heads and the query width do not give a head size"
        if op.attr("do_rotary", 0) and (array(graph, match["cos"]) is None or array(graph, match["sin"]) is None):
            return "rotary without constant cos/sin caches is not decomposed"
        mask, tokens = _inputs(graph)
        if mask is None or tokens is None:
            return "the graph has no 2-D attention_mask and input_ids inputs to build the mask from"
        return None if opset(graph) >= 13 else "needs opset 13"

    def rewrite(self, graph: Graph, match: Match) -> None:
        op = match.root
        heads, kv_heads, d = _sizes(graph, match)
        b = Builder(graph, op)
        mask, tokens = _inputs(graph)
        q, k, v = self._qkv(graph, b, match, heads, kv_heads, d)
        scale = float(op.attr("scale", 0.0) or 1.0 / math.sqrt(d))
        rotary = bool(op.attr("do_rotary", 0))
        detach(graph, op)
        q = _split(b, q, heads, d)
        k = _split(b, k, kv_heads, d)
        v = _split(b, v, kv_heads, d)
        if rotary:
            cos, sin = _rotary_tables(graph, b, match["cos"], match["sin"], mask, tokens)
            q, k = _rotate(b, q, cos, sin, d), _rotate(b, k, cos, sin, d)
        for past in (match["past_key"], match["past_value"]):
            _static_cache_dims(past, kv_heads, d)
        keys = b.op("Concat", match["past_key"], k, axis=2, out=match["present_key"])
        values = b.op("Concat", match["past_value"], v, axis=2, out=match["present_value"])
        for present in (match["present_key"], match["present_value"]):
            if present is not None:
                _static_cache_dims(present, kv_heads, d)
        n_rep = heads // kv_heads
        keys, values = _repeat(b, keys, n_rep, heads, d), _repeat(b, values, n_rep, heads, d)
        scores = b.op("Mul", b.op("MatMul", q, b.op("Transpose", keys, perm=[0, 1, 3, 2])), b.const("scale", scale))
        probs = b.op("Softmax", b.op("Add", scores, _mask_bias(graph, b, mask, tokens)), axis=-1)
        context = b.op("Transpose", b.op("MatMul", probs, values), perm=[0, 2, 1, 3])
        b.op("Reshape", context, b.const("merged_shape", [0, 0, heads * d], np.int64), out=match["y"])

    @staticmethod
    def _qkv(graph: Graph, b: Builder, match: Match, heads: int, kv_heads: int, d: int) -> tuple[Value, Value, Value]:
        if match["key"] is not None and match["value"] is not None:
            return match["query"], match["key"], match["value"]
        bounds = np.cumsum([0, heads * d, kv_heads * d, kv_heads * d])
        query = match["query"]
        producer = graph.producer(query)
        weight = array(graph, graph.inputs_of(producer)[1]) if producer is not None and producer.op_type == "MatMul" \
            and not producer.domain else None
        if weight is not None and weight.ndim == 2 and weight.shape[1] == bounds[-1] \
                and owned(graph, [producer, match.root], graph.inputs_of(producer)[1], query):
            x = graph.inputs_of(producer)[0]
            return tuple(b.op("MatMul", x, b.const(f"{name}_proj_weight", weight[:, lo:hi], weight.dtype))
                         for name, lo, hi in zip("qkv", bounds[:-1], bounds[1:]))
        axis = b.const("last_axis", [-1], np.int64)
        return tuple(b.op("Slice", query, b.const("start", [lo], np.int64), b.const("end", [hi], np.int64), axis)
                     for lo, hi in zip(bounds[:-1], bounds[1:]))


def _sizes(graph: Graph, match: Match) -> tuple[int, int, int] | None:
    op = match.root
    heads, kv_heads = int(op.attr("num_heads", 0) or 0), int(op.attr("kv_num_heads", 0) or 0)
    width = match["query"].shape[-1] if match["query"] is not None and match["query"].shape else None
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads or not isinstance(width, int):
        return None
    packed = match["key"] is None
    d, rest = divmod(width, heads + 2 * kv_heads) if packed else divmod(width, heads)
    return (heads, kv_heads, d) if d > 0 and rest == 0 and d % 2 == 0 else None


def _split(b: Builder, x: Value, heads: int, d: int) -> Value:
    return b.op("Transpose", b.op("Reshape", x, b.const("heads_shape", [0, 0, heads, d], np.int64)), perm=[0, 2, 1, 3])


def _repeat(b: Builder, x: Value, n_rep: int, heads: int, d: int) -> Value:
    if n_rep == 1:
        return x
    expanded = b.op("Expand", b.axes("Unsqueeze", x, [2]), b.const("repeat", [1, 1, n_rep, 1, 1], np.int64))
    return b.op("Reshape", expanded, b.const("repeat_shape", [0, heads, -1, d], np.int64))


def _rotate(b: Builder, x: Value, cos: Value, sin: Value, d: int) -> Value:
    half, axis = d // 2, b.const("last", [-1], np.int64)
    x1 = b.op("Slice", x, b.const("zero", [0], np.int64), b.const("half", [half], np.int64), axis)
    x2 = b.op("Slice", x, b.const("half_", [half], np.int64), b.const("end", [np.iinfo(np.int64).max], np.int64), axis)
    rotated = b.op("Concat", b.op("Neg", x2), x1, axis=-1)
    return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, sin))


def _rotary_tables(graph: Graph, b: Builder, cos_cache: Value, sin_cache: Value, mask: Value,
                   tokens: Value) -> tuple[Value, Value]:
    """cos/sin [S, d] at positions T - S .. T - 1, built once per graph and shared."""
    names = (f"{ROTARY}/cos", f"{ROTARY}/sin")
    if all(graph.has_value(n) and graph.producer(graph.value(n)) is not None for n in names):
        return graph.value(names[0]), graph.value(names[1])
    # Rows T - S .. T - 1 as a Slice (a Gather from a constant would read as an embedding lookup
    # and be quantized like one).
    dim1 = b.const("dim1", [1], np.int64)
    total = b.op("Slice", b.op("Shape", mask), dim1, b.const("dim2", [2], np.int64))
    new = b.op("Slice", b.op("Shape", tokens), dim1, b.const("dim2_", [2], np.int64))
    start = b.op("Sub", total, new)
    tables = []
    for cache, name in ((cos_cache, names[0]), (sin_cache, names[1])):
        half = b.op("Slice", cache, start, total, b.const("rows", [0], np.int64))
        tables.append(b.op("Concat", half, half, axis=-1, out=Value(graph.unique_name(name))))
    return tables[0], tables[1]


def _mask_bias(graph: Graph, b: Builder, mask: Value, tokens: Value) -> Value:
    """The canonical causal+padding bias [B, 1, S, T], built once per graph and shared."""
    if graph.has_value(MASK_BIAS) and graph.producer(graph.value(MASK_BIAS)) is not None:
        return graph.value(MASK_BIAS)
    return b.op("Add", padding_bias(b, mask), causal_bias(b, mask, tokens), out=Value(MASK_BIAS))


def _static_cache_dims(value: Value, kv_heads: int, d: int) -> None:
    shape = value.shape
    if shape is None or len(shape) != 4 or value.elem_type is None:
        return
    if shape[1] != kv_heads or shape[3] != d:
        value.set_type(value.elem_type, [shape[0], kv_heads, shape[2], d])


RULES = (GroupQueryAttention(),)
