"""Fold constant subgraphs and shape arithmetic with onnxscript's constant folder, and turn
Constant nodes into initializers.

The folding is onnxscript's (`onnxscript.optimizer.fold_constants`): ops whose inputs are all
constant are evaluated with onnx's reference implementation, and shapes are propagated
symbolically, so `Shape` of statically known dims folds (also through Gather/Slice/Concat of a
partly symbolic shape), `Reshape`/`Expand`/`Cast` that do nothing become `Identity` (their
readers are rewired; dead-code-elimination removes them), `If` on a constant condition is
inlined and `Dropout` at inference disappears. It runs on an onnx_ir model built from the
graph's structure (`edgeq.frontend.onnx_ir_bridge`): weights up to the size limit are wrapped,
not copied, and larger ones are typed graph inputs, so nothing is computed from them.

What this pass keeps of its own and why:
- the choice of what folds (`should_fold`): never random ops, control flow or Q/DQ (a
  DequantizeLinear of an integer weight is the quantized format itself, not foldable work),
  never an op writing a graph output (its output must stay an op's output under its name, and
  a fixed-point pipeline must see no change), and always ConstantOfShape/Expand/Range etc. of
  small outputs, which onnxscript's defaults keep (its blacklist keeps ConstantOfShape);
- Gather(Shape(x), k) of static dims with a scalar index k folds here (onnxscript's Gather
  evaluator takes only 1-D indices of a partly symbolic shape; TorchScript writes scalars), and
  the folder runs once more on what that opened;
- Constant nodes become initializers here (onnxscript only lifts them in its full
  `optimize` pipeline, together with rewrites this pass does not want);
- initializers that are also graph inputs are overridable defaults, never constants: onnxscript
  skips every op reading a graph input, which is exactly that rule;
- a graph with sparse initializers is left to the Constant-node step (onnx_ir does not carry them).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
from onnxscript.optimizer import fold_constants

from edgeq.frontend.onnx_ir_bridge import from_onnx_ir, to_onnx_ir
from edgeq.ir import Graph, Op
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.registry import register_pass

# Ops that must never be folded: random, or with state/side effects, or control flow, or the
# quantized format itself.
_NEVER_FOLD = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
               "Bernoulli", "If", "Loop", "Scan", "Dropout", "QuantizeLinear", "DequantizeLinear",
               "DynamicQuantizeLinear"}
# Shape work only (fold_weights=False): outputs and constant inputs up to this many bytes.
_SHAPE_WORK_BYTES = 1 << 16


@register_pass
class ConstantFolding(Pass):
    name = "constant-folding"
    description = "fold constant subgraphs and shape arithmetic (onnxscript's folder); Constant nodes to initializers"

    def __init__(self, max_output_bytes: int = 64 << 20, fold_weights: bool = True):
        self.max_output_bytes = max_output_bytes
        # When False, only shape-sized work is folded (up to 64 KiB): weights stay as exported.
        self.fold_weights = fold_weights

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        limit = self.max_output_bytes if self.fold_weights else _SHAPE_WORK_BYTES
        before = _signature(graph)
        modified = False
        for _ in range(0 if graph.sparse_initializers else 2):  # (onnx_ir has no sparse initializers)
            # a second round only when the static-dim Gathers below opened more
            ir_model, bridge = to_onnx_ir(graph, hide_above=limit)
            result = fold_constants(ir_model, onnx_shape_inference=True, input_size_limit=limit,
                                    output_size_limit=max(1, limit // 4), should_fold=_should_fold(limit))
            if result.modified:
                graph.take_contents(from_onnx_ir(ir_model, bridge))
                modified = True
            if not _fold_static_dim_gathers(graph):
                break
            modified = True
        folded = simplified = 0
        if modified:
            folded, simplified = _changes(before, graph)
        constants = sum(_constant_to_initializer(graph, op) for op in graph.ops() if op.op_type == "Constant")
        return PassResult(graph, bool(modified or constants),
                          {"ops_folded": folded, "ops_simplified": simplified,
                           "constant_nodes_to_initializers": constants})


def _should_fold(limit: int):
    """onnxscript's `should_fold` hook: False refuses, True folds whatever the defaults say."""

    def decide(node: ir.Node) -> bool:
        if node.domain not in ("", "ai.onnx") or node.op_type in _NEVER_FOLD:
            return False
        if any(v is not None and v.is_graph_output() for v in node.outputs):
            return False
        return all(v is None or v.const_value is None or v.const_value.nbytes <= limit for v in node.inputs)

    return decide


def _fold_static_dim_gathers(graph: Graph) -> int:
    """Gather(Shape(x), k) with a constant index k, axis 0, where x's dims at k are static ints:
    the constant dims. onnxscript folds this only for 1-D indices; the TorchScript exporter
    writes scalar ones (Shape -> Gather(k) -> Unsqueeze) for every head split."""
    count = 0
    for gather in [op for op in graph.ops() if op.op_type == "Gather"]:
        data, index = graph.inputs_of(gather)[:2]
        shape_op = graph.producer(data) if data is not None else None
        out = graph.outputs_of(gather)[0]
        if (gather.domain or gather.attr("axis", 0) != 0 or shape_op is None or shape_op.op_type != "Shape"
                or shape_op.domain or graph.constant(index) is None or graph.is_graph_output(out)):
            continue
        dims = graph.inputs_of(shape_op)[0].shape
        if dims is None:
            continue
        rank = len(dims)
        start, end = shape_op.attr("start", 0), shape_op.attr("end", rank)
        start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
        dims = dims[max(0, start):min(rank, end)]
        k = graph.constant(index).numpy()
        try:
            picked = np.asarray(dims, dtype=object)[k]
        except IndexError:
            continue
        values = np.atleast_1d(picked).tolist()
        if not all(isinstance(d, int) and d > 0 for d in values):
            continue
        const = graph.add_constant(out.name + "_static", np.asarray(picked, np.int64).reshape(k.shape))
        graph.replace_all_uses(out, const)
        graph.remove_op(gather)
        count += 1
    return count


def _signature(graph: Graph) -> Counter:
    """How many ops of each kind the graph has (the folder's Constant nodes not counted)."""
    return Counter(op.kind for op in graph.ops() if op.op_type != "Constant")


def _changes(before: Counter, graph: Graph) -> tuple[int, int]:
    """(ops folded into constants, ops replaced by an Identity the readers bypass): of the ops
    gone, those the new Identity ops stand for are simplified, the others folded."""
    after = _signature(graph)
    gone = sum((before - after).values())
    simplified = min(gone, max(0, after["Identity"] - before["Identity"]))
    return gone - simplified, simplified


def _constant_to_initializer(graph: Graph, op: Op) -> bool:
    if op.domain:
        return False
    out = graph.outputs_of(op)[0]
    tensor = graph.constant(out)
    if tensor is None or graph.is_graph_output(out):
        return False
    graph.remove_op(op, remove_outputs=False)
    # The Value object stays (readers hold it) and becomes an initializer.
    out.const = tensor
    out.type = None  # the tensor types it; a declared value_info may contradict it (genai's builder: [1] as [])
    graph.initializers.append(out)
    return True
