"""com.microsoft attention ops -> the canonical attention core (canonical.md item 5).

- `Attention(input, weights, bias?, mask_index?, past?, attention_bias?)`: the packed QKV weight
  splits into three linear layers, `MatMul(x, W_q)` then `Add(., b_q)`; heads split as
  `Transpose(Reshape(x, [0, 0, H, d]), [0, 2, 1, 3])`, k transposed by `[0, 1, 3, 2]`, one
  `Mul(scores, scale)`, the masks as additive biases (a 2-D mask_index as
  `Mul(Sub(1, Cast(Unsqueeze(mask))), mask_filter_value)`, `unidirectional` as the causal bias;
  the `mask` module then makes them canonical), `Softmax`, `MatMul(probs, v)`, heads merged by
  `Reshape(Transpose(x, [0, 2, 1, 3]), [0, 0, H*d])`. Splitting the packed weight copies it, so
  the rule refuses when that weight (or bias) is shared outside the op.
- `MultiHeadAttention(query, key, value, bias?, key_padding_mask?, attention_bias?)` with 3-D
  query/key/value, likewise.
Refused, with the reason: past key/values or a present output, 1-D/3-D/4-D mask_index,
rotary inside the op, packed or BNSH inputs. `RotaryEmbedding` and the packed/sparse/decoder
variants are reported as not yet supported (`GroupQueryAttention` has its own module).
"""

from __future__ import annotations

import math

import numpy as np

from edgeq.frontend.rules.base import Builder, Match, Rule, array, detach, opset, owned, rank_of
from edgeq.frontend.rules.mask import blocked_bias, causal_bias
from edgeq.ir import Graph, Op, Value

MS = "com.microsoft"


def _used(graph: Graph, value: Value | None) -> bool:
    return value is not None and bool(graph.consumers(value) or graph.is_graph_output(value))


def _core(b: Builder, q: Value, k: Value, v: Value, heads: int, dq: int, dv: int, scale: float,
          biases: list[Value], out: Value) -> None:
    """Split heads, scores, one scale, the additive biases, softmax, context, merge heads into `out`."""
    def split(x: Value, d: int) -> Value:
        shaped = b.op("Reshape", x, b.const("heads_shape", [0, 0, heads, d], np.int64))
        return b.op("Transpose", shaped, perm=[0, 2, 1, 3])

    k_t = b.op("Transpose", split(k, dq), perm=[0, 1, 3, 2])
    scores = b.op("Mul", b.op("MatMul", split(q, dq), k_t), b.const("scale", scale))
    for bias in biases:
        scores = b.op("Add", scores, bias)
    probs = b.op("Softmax", scores, axis=-1)
    context = b.op("Transpose", b.op("MatMul", probs, split(v, dv)), perm=[0, 2, 1, 3])
    b.op("Reshape", context, b.const("merged_shape", [0, 0, heads * dv], np.int64), out=out)


class MicrosoftAttention(Rule):
    name = "attention-com-microsoft"
    roots = frozenset({f"{MS}::Attention"})

    def match(self, graph: Graph, op: Op) -> Match | None:
        ins = graph.inputs_of(op) + [None] * 7
        outs = graph.outputs_of(op) + [None]
        return Match(op, [op], {"x": ins[0], "weights": ins[1], "bias": ins[2], "mask": ins[3], "past": ins[4],
                                "attention_bias": ins[5], "past_length": ins[6], "y": outs[0],
                                "present": outs[1]})

    def check(self, graph: Graph, match: Match) -> str | None:
        op = match.root
        if match["past"] is not None or match["past_length"] is not None or _used(graph, match["present"]):
            return "past key/values (a KV cache) are not decomposed yet"
        if op.attr("do_rotary", 0):
            return "rotary inside the op (do_rotary) is not decomposed yet"
        weights = array(graph, match["weights"])
        if weights is None or weights.ndim != 2:
            return "its packed QKV weight is not a constant matrix"
        if match["bias"] is not None and array(graph, match["bias"]) is None:
            return "its QKV bias is not constant"
        if not owned(graph, [op], match["weights"], match["bias"]):
            return "its packed QKV weight is shared outside the op (splitting it would copy it)"
        if match["mask"] is not None and rank_of(match["mask"]) != 2:
            return f"mask_index of rank {rank_of(match['mask'])}: only a 2-D [batch, total] mask is decomposed"
        sizes = _qkv_sizes(op, weights.shape[1])
        heads = op.attr("num_heads") or 0
        if heads <= 0 or sizes is None or any(s % heads for s in sizes) or sizes[0] != sizes[1]:
            return f"qkv_hidden_sizes {sizes} do not split into {heads} heads"
        return None if opset(graph) >= 13 else "needs opset 13"

    def rewrite(self, graph: Graph, match: Match) -> None:
        op = match.root
        b = Builder(graph, op)
        weights = array(graph, match["weights"])
        bias = array(graph, match["bias"]) if match["bias"] is not None else None
        sizes = _qkv_sizes(op, weights.shape[1])
        heads = op.attr("num_heads")
        bounds = np.cumsum([0, *sizes])
        x = match["x"]
        biases = _biases(b, op, match, x, x)
        detach(graph, op)
        projected = []
        for name, lo, hi in zip("qkv", bounds[:-1], bounds[1:]):
            y = b.op("MatMul", x, b.const(f"{name}_weight", weights[:, lo:hi], weights.dtype))
            if bias is not None:
                y = b.op("Add", y, b.const(f"{name}_bias", bias[lo:hi], bias.dtype))
            projected.append(y)
        dq, dv = sizes[0] // heads, sizes[2] // heads
        _core(b, *projected, heads, dq, dv, _scale(op, dq), biases, match["y"])


def _qkv_sizes(op: Op, total: int) -> list[int] | None:
    sizes = op.attr("qkv_hidden_sizes")
    if sizes:
        sizes = [int(s) for s in sizes]
        return sizes if len(sizes) == 3 and sum(sizes) == total else None
    return [total // 3] * 3 if total % 3 == 0 else None


def _scale(op: Op, head_dim: int) -> float:
    scale = op.attr("scale", 0.0)
    return float(scale) if scale else 1.0 / math.sqrt(head_dim)


def _biases(b: Builder, op: Op, match: Match, keys: Value, queries: Value) -> list[Value]:
    """The additive terms of the scores: attention_bias, then the masks as one bias (padding
    from the 2-D mask, causal with T = dim 1 of `keys` and S = dim 1 of `queries`)."""
    filter_value = float(op.attr("mask_filter_value", -10000.0))
    masks = []
    if match["mask"] is not None:
        masks.append(blocked_bias(b, b.axes("Unsqueeze", match["mask"], [1, 2]), np.float32, filter_value,
                                  "attention_mask_bias_fused"))
    if op.attr("unidirectional", 0):
        masks.append(causal_bias(b, keys, queries, np.float32, filter_value))
    if len(masks) == 2:
        masks = [b.op("Add", *masks)]
    return ([match["attention_bias"]] if match["attention_bias"] is not None else []) + masks


class MicrosoftMultiHeadAttention(Rule):
    name = "attention-com-microsoft-mha"
    roots = frozenset({f"{MS}::MultiHeadAttention"})

    def match(self, graph: Graph, op: Op) -> Match | None:
        ins = graph.inputs_of(op) + [None] * 10
        outs = graph.outputs_of(op) + [None] * 4
        return Match(op, [op], {"q": ins[0], "k": ins[1], "v": ins[2], "bias": ins[3], "mask": ins[4],
                                "attention_bias": ins[5], "y": outs[0]},
                     {"past": [v for v in ins[6:10] if v is not None], "extra": outs[1:4]})

    def check(self, graph: Graph, match: Match) -> str | None:
        if match.params["past"] or any(_used(graph, v) for v in match.params["extra"]):
            return "past key/values, present or qk outputs are not decomposed yet"
        if match["k"] is None or match["v"] is None:
            return "packed query/key/value inputs are not decomposed yet"
        ranks = [rank_of(match[n]) for n in "qkv"]
        if ranks != [3, 3, 3]:
            return f"query/key/value of ranks {ranks}: only [batch, sequence, hidden] inputs are decomposed"
        if match["bias"] is not None and array(graph, match["bias"]) is None:
            return "its QKV bias is not constant"
        if match["mask"] is not None and rank_of(match["mask"]) != 2:
            return f"key_padding_mask of rank {rank_of(match['mask'])}: only a 2-D [batch, total] mask is decomposed"
        if _mha_sizes(graph, match) is None:
            return "the hidden sizes are unknown or do not split into the heads"
        return None

    def rewrite(self, graph: Graph, match: Match) -> None:
        op = match.root
        b = Builder(graph, op)
        heads = op.attr("num_heads")
        dq_total, dv_total = _mha_sizes(graph, match)
        bias = array(graph, match["bias"]) if match["bias"] is not None else None
        q, k, v = match["q"], match["k"], match["v"]
        biases = _biases(b, op, match, k, q)
        detach(graph, op)
        if bias is not None:
            bounds = [0, dq_total, 2 * dq_total, 2 * dq_total + dv_total]
            q, k, v = (b.op("Add", t, b.const(f"{n}_bias", bias[lo:hi], bias.dtype))
                       for t, n, lo, hi in zip((q, k, v), "qkv", bounds[:-1], bounds[1:]))
        dq, dv = dq_total // heads, dv_total // heads
        _core(b, q, k, v, heads, dq, dv, _scale(op, dq), biases, match["y"])


def _mha_sizes(graph: Graph, match: Match) -> tuple[int, int] | None:
    heads = match.root.attr("num_heads") or 0
    dq = match["q"].shape[-1] if match["q"].shape else None
    dv = match["v"].shape[-1] if match["v"].shape else None
    if match["bias"] is not None and isinstance(dq, int) and not isinstance(dv, int):
        dv = array(graph, match["bias"]).size - 2 * dq
    if heads <= 0 or not isinstance(dq, int) or not isinstance(dv, int) or dq % heads or dv % heads:
        return None
    return dq, dv


class NotYetSupported(Rule):
    """com.microsoft ops the front end names but does not decompose yet."""

    name = "com-microsoft-not-yet-supported"
    roots = frozenset(f"{MS}::{t}" for t in ("RotaryEmbedding", "PackedAttention",
                                             "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention",
                                             "SparseAttention", "EmbedLayerNormalization"))

    def match(self, graph: Graph, op: Op) -> Match | None:
        return Match(op, [op])

    def check(self, graph: Graph, match: Match) -> str | None:
        return f"{match.root.op_type} is not decomposed yet"

    def rewrite(self, graph: Graph, match: Match) -> None:  # never reached: check always refuses
        raise AssertionError("NotYetSupported never rewrites")


RULES = (MicrosoftAttention(), MicrosoftMultiHeadAttention(), NotYetSupported())
