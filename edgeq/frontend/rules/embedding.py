"""A tied embedding read through a Transpose -> a Gather from its own table (the form edgeq's
builders and torch.onnx exports write: the LM head's [hidden, vocab] weight and a [vocab, hidden]
table).

onnxruntime-genai's builder ties SmolLM2's embedding to the LM head as
`Gather(Transpose(lm_head_weight, perm=[1, 0]), input_ids)`; constant folding leaves a 113 MB
Transpose alone, so passes that fold into the embedding table (the Hadamard rotation of the
residual stream, embedding quantization) would not see a table. The rewrite stores the transpose
as a constant (a copy of the weight, as the exporters' tied models have) and gathers from it.
"""

from __future__ import annotations

import numpy as np

from edgeq.frontend.rules.base import Builder, Match, Rule, array, detach
from edgeq.ir import Graph, Op


class TransposedEmbeddingTable(Rule):
    name = "embedding-from-transposed-table"
    roots = frozenset({"Gather"})

    def match(self, graph: Graph, op: Op) -> Match | None:
        table, indices = (graph.inputs_of(op) + [None, None])[:2]
        transpose = graph.producer(table) if table is not None else None
        if transpose is None or transpose.op_type != "Transpose" or transpose.domain or indices is None:
            return None
        weight = graph.inputs_of(transpose)[0]
        if weight is None or weight.const is None:
            return None
        return Match(op, [op, transpose], {"weight": weight, "indices": indices, "y": graph.outputs_of(op)[0]})

    def check(self, graph: Graph, match: Match) -> str | None:
        op, transpose = match.ops
        if op.attr("axis", 0) != 0:
            return "the Gather is not along the table's rows"
        if len(match["weight"].const.dims) != 2 or list(transpose.attr("perm") or [1, 0]) != [1, 0]:
            return "the table is not a transposed 2-D weight"
        return None

    def rewrite(self, graph: Graph, match: Match) -> None:
        op = match.root
        table = np.ascontiguousarray(array(graph, match["weight"]).T)
        b = Builder(graph, op)
        detach(graph, op)
        b.op("Gather", b.const("embedding_table", table, table.dtype), match["indices"], axis=0, out=match["y"])


RULES = (TransposedEmbeddingTable(),)
