"""The decoders' attention-mask biases (canonical form 6) as integer masks computed from positions.

    causal, [1, 1, S, T]:  Mul(Sub(1.0, Cast(Unsqueeze(LessOrEqual(Unsqueeze(Range(0, T, 1), [0]),
                                                                   Unsqueeze(Range(T - S, T, 1), [1])), [0, 1]),
                                         to=FLOAT)), c)
    both, [B, 1, S, T]:    Add(padding_bias, causal_bias), padding_bias = Mul(Sub(1.0, Cast(Unsqueeze(
                               attention_mask, [1, 2]), to=FLOAT)), c)

with T = dim 1 of attention_mask (keys) and S = dim 1 of input_ids (queries). They become one
CausalMask step (edgeq.backends.fpga.integer.decoder): integer compares of the key and query
positions (Range, LessOrEqual on int64) and the 0/1 mask, each masked term adding -2^30 as the
float bias adds c, batch and sequence kept dynamic. How the graph computes T and S is not taken
on trust: the LessOrEqual's subgraph is evaluated on probe shapes (T != S among them) and must
give key j <= T - S + i. The key-padding bias alone stays the encoder's AttentionMask
(edgeq.backends.fpga.lowering.attention).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from edgeq.backends.fpga.integer.decoder import CausalMask
from edgeq.backends.fpga.lowering.state import Lowering
from edgeq.errors import OptionError
from edgeq.ir import Graph, Op, Value

# A mask constant at or below this is "minus infinity" for softmax in float32 (canonical c = -10000).
MASK_LIMIT = -1e4
# (T, S) of the probes: keys = past + new tokens, queries = new tokens.
PROBES = ((7, 5), (4, 4), (3, 1), (6, 2))
_INTEGER = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
_CANONICAL_CAUSAL = "key j <= T - S + i (T = dim 1 of the attention mask, S = dim 1 of the ids)"


@dataclass(frozen=True)
class Term:
    """One term of an additive bias: Mul(Sub(1, Cast(Unsqueeze(source, axes))), c)."""

    kind: str        # "padding" (source: the 0/1 mask input) or "causal" (source: the LessOrEqual)
    source: Value


def position_mask(lowering: Lowering, value: Value, reader: Op) -> str | None:
    """The integer mask of a canonical causal or causal + padding bias `value`, or None when it
    has no causal term."""
    graph = lowering.graph
    producer = graph.producer(value)
    values = graph.inputs_of(producer) if producer is not None and producer.op_type == "Add" \
        and not producer.domain else [value]
    terms = [bias_term(graph, v) for v in values]
    kinds = sorted(t.kind for t in terms if t is not None)
    if "causal" not in kinds:
        return None
    if None in terms or kinds not in (["causal"], ["causal", "padding"]):
        raise OptionError(f"Add '{reader.name}': the attention bias '{value.name}' is not a canonical causal or "
                          "causal + padding bias", fix="run the front end's canonicalize pass first")
    causal = next(t for t in terms if t.kind == "causal")
    padding = next((t for t in terms if t.kind == "padding"), None)
    keys, queries = positions(graph, causal.source, reader)
    if padding is not None and padding.source is not keys:
        raise OptionError(f"Add '{reader.name}': the causal mask counts keys in '{keys.name}' but the padding "
                          f"reads '{padding.source.name}'", fix="run the front end's canonicalize pass first")
    return lowering.emit(CausalMask(keys.name, queries.name, padding is not None, unit="mask@causal_mask"))


def bias_term(graph: Graph, value: Value | None) -> Term | None:
    """Mul(Sub(1.0, Cast(Unsqueeze(source, axes), to=FLOAT)), c <= MASK_LIMIT) as a Term, or None."""
    mul = graph.producer(value) if value is not None else None
    if mul is None or mul.op_type != "Mul" or mul.domain:
        return None
    ins = graph.inputs_of(mul)
    consts = [graph.constant(v) for v in ins]
    if len(ins) != 2 or sum(c is not None for c in consts) != 1:
        return None
    factor = consts[0] if consts[0] is not None else consts[1]
    sub = graph.producer(ins[1] if consts[0] is not None else ins[0])
    if factor.numpy().size != 1 or not float(factor.numpy().reshape(())) <= MASK_LIMIT or sub is None \
            or sub.op_type != "Sub":
        return None
    one = graph.constant(graph.inputs_of(sub)[0])
    cast = graph.producer(graph.inputs_of(sub)[1])
    if one is None or one.numpy().size != 1 or float(one.numpy().reshape(())) != 1.0 or cast is None \
            or cast.op_type != "Cast" or cast.attr("to") != onnx.TensorProto.FLOAT:
        return None
    unsqueeze = graph.producer(graph.inputs_of(cast)[0])
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
        return None
    source, axes_value = (graph.inputs_of(unsqueeze) + [None])[:2]
    axes = graph.constant(axes_value).numpy().reshape(-1).tolist() if graph.constant(axes_value) is not None \
        else unsqueeze.attr("axes")
    if source is None or axes is None:
        return None
    origin = graph.producer(source)
    if origin is None and source.elem_type in _INTEGER and list(axes) == [1, 2]:
        return Term("padding", source)
    if origin is not None and origin.op_type == "LessOrEqual" and list(axes) == [0, 1]:
        return Term("causal", source)
    return None


def positions(graph: Graph, allowed: Value, reader: Op) -> tuple[Value, Value]:
    """(keys input, queries input): the graph inputs whose dim 1 are T and S in the causal
    LessOrEqual `allowed`, found by evaluating its subgraph on probe shapes."""
    ops = graph.ancestors(allowed)
    upstream = graph.upstream(allowed)
    inputs = [v for v in graph.inputs if v in upstream]
    problem = (f"Add '{reader.name}': the causal mask '{allowed.name}' does not compute {_CANONICAL_CAUSAL}")
    if not inputs or len(inputs) > 2 or any(v.shape is not None and len(v.shape) != 2 for v in inputs):
        raise OptionError(problem, fix="run the front end's canonicalize pass first")
    model = _submodel(graph, ops, inputs, allowed)
    evaluator = ReferenceEvaluator(model)
    rng = np.random.default_rng(0)
    for keys, queries in itertools.product(inputs, repeat=2):
        probes = [(t, s) for t, s in PROBES if keys is not queries or t == s]
        if len(inputs) == 2 and keys is queries:
            continue
        if all(_matches(evaluator, inputs, keys, queries, t, s, rng) for t, s in probes):
            return keys, queries
    raise OptionError(problem, fix="run the front end's canonicalize pass first")


def _matches(evaluator, inputs: list[Value], keys: Value, queries: Value, total: int, new: int,
             rng: np.random.Generator) -> bool:
    feeds = {}
    for value in inputs:
        length = total if value is keys else new
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.elem_type or onnx.TensorProto.INT64)
        feeds[value.name] = rng.integers(0, 2, size=(2, length)).astype(dtype)
    try:
        (got,) = evaluator.run(None, feeds)
    except Exception:  # noqa: BLE001 - a subgraph that fails on a probe is not the canonical one
        return False
    expected = np.arange(total)[None, :] <= np.arange(total - new, total)[:, None]
    return np.shape(got) == expected.shape and np.array_equal(np.asarray(got, bool), expected)


def _submodel(graph: Graph, ops: set[Op], inputs: list[Value], output: Value) -> onnx.ModelProto:
    """The ops computing `output` from `inputs` (and constants) as a model."""
    nodes, initializers, seen = [], [], set()
    for op in graph.topo_order():
        if op not in ops:
            continue
        if op.domain or op.subgraphs:
            raise OptionError(f"the causal mask reads {op.kind} '{op.name}'",
                              fix="run the front end's canonicalize pass first")
        ins = graph.inputs_of(op)
        node = helper.make_node(op.op_type, [v.name if v is not None else "" for v in ins],
                                [v.name if v is not None else "" for v in graph.outputs_of(op)])
        node.attribute.extend(op.attributes.values())
        nodes.append(node)
        for v in ins:
            const = graph.constant(v)
            if const is not None and v.name not in seen:
                seen.add(v.name)
                initializers.append(numpy_helper.from_array(const.numpy(), v.name))
    graph_inputs = [helper.make_tensor_value_info(v.name, v.elem_type or onnx.TensorProto.INT64, None)
                    for v in inputs]
    body = helper.make_graph(nodes, "causal_mask", graph_inputs,
                             [helper.make_tensor_value_info(output.name, onnx.TensorProto.BOOL, None)], initializers)
    opset = (graph.model.opset_imports.get("", graph.model.opset_imports.get("ai.onnx", 21))
             if graph.model is not None else 21)
    return helper.make_model(body, opset_imports=[helper.make_opsetid("", opset)])
