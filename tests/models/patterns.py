"""Checks of the graph shapes the builders promise, on plain ONNX protos (no edgeq IR)."""

from __future__ import annotations

from collections import Counter, defaultdict

import onnx


class Graph:
    """Producer/consumer lookups over a GraphProto."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes = list(model.graph.node)
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.producer = {out: n for n in self.nodes for out in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for value in node.input:
                self.consumers[value].append(node)

    def of_type(self, op_type: str) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if n.op_type == op_type]

    def input_op(self, node: onnx.NodeProto, slot: int) -> str | None:
        producer = self.producer.get(node.input[slot])
        return producer.op_type if producer else None

    def only_consumer(self, node: onnx.NodeProto) -> onnx.NodeProto:
        (consumer,) = self.consumers[node.output[0]]
        return consumer

    def follows(self, node: onnx.NodeProto, *op_types: str) -> bool:
        """The chain node -> op_types[0] -> op_types[1] ... of single consumers exists."""
        for op_type in op_types:
            users = self.consumers[node.output[0]]
            if len(users) != 1 or users[0].op_type != op_type:
                return False
            node = users[0]
        return True


def attention_blocks(g: Graph, scale_op: str) -> int:
    """MatMul -> scale -> mask Add -> Softmax -> MatMul, counted once per Softmax."""
    count = 0
    for softmax in g.of_type("Softmax"):
        add = g.producer[softmax.input[0]]
        scale = next(g.producer[v] for v in add.input if v in g.producer
                     and g.producer[v].op_type == scale_op)
        assert add.op_type == "Add" and g.input_op(scale, 0) == "MatMul"
        assert g.only_consumer(softmax).op_type == "MatMul"
        count += 1
    return count


def rms_norms(g: Graph) -> int:
    """Pow -> ReduceMean -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x) -> Mul(gain)."""
    found = [n for n in g.of_type("Pow") if g.follows(n, "ReduceMean", "Add", "Sqrt", "Reciprocal",
                                                       "Mul", "Mul")]
    return len(found)


def gelu_erfs(g: Graph) -> int:
    return sum(1 for n in g.of_type("Div") if g.follows(n, "Erf", "Add", "Mul", "Mul"))


def silus(g: Graph) -> int:
    return sum(1 for n in g.of_type("Sigmoid")
               if g.only_consumer(n).op_type == "Mul" and n.input[0] in g.only_consumer(n).input)


def linear_weights(g: Graph) -> dict[str, tuple[int, ...]]:
    """Shapes of the initializers that are MatMul's B input ([in, out])."""
    return {n.input[1]: tuple(g.initializers[n.input[1]].dims)
            for n in g.of_type("MatMul") if n.input[1] in g.initializers}


def op_sequence(model: onnx.ModelProto) -> list[tuple[str, str]]:
    return [(n.op_type, n.name) for n in model.graph.node]


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)
