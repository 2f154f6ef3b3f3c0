"""Small hand-built graphs for the front end's rule tests, and the checks every rule test makes:
the op kinds after `canonicalize`, a valid graph, and ONNX Runtime outputs unchanged."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.ir import Graph, load, to_model_proto
from edgeq.pipeline import PassContext, PassManager
from edgeq.registry import get_pass
from tests.passes.helpers import assert_valid, run

F = TensorProto.FLOAT
I64 = TensorProto.INT64
MS = "com.microsoft"
PREPROCESS = ("convert-opset", "identity-elimination", "constant-folding", "dead-code-elimination", "shape-inference")
node = helper.make_node


def vi(name: str, shape, elem_type: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def const(name: str, data, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(data, dtype=dtype), name)


def model(nodes, inputs, outputs, initializers=(), *, opset: int = 21, ms: bool = False) -> onnx.ModelProto:
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(MS, 1)] if ms else [])
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=imports, ir_version=10)


def canonicalize(source: onnx.ModelProto | Graph, *, preprocess: bool = False) -> tuple[Graph, dict[str, int]]:
    """The graph after `canonicalize` (after the target's preprocessing when asked) and its stats."""
    graph = load(source) if isinstance(source, onnx.ModelProto) else source
    ctx = PassContext()
    if preprocess:
        PassManager([get_pass(name)() for name in PREPROCESS])(graph, ctx)
    result = get_pass("canonicalize")()(graph, ctx)
    return result.graph, dict(result.stats)


def kinds(graph: Graph) -> Counter:
    return Counter(op.kind for op in graph.ops())


def assert_same_outputs(before: onnx.ModelProto | Graph, after: Graph, feeds: dict[str, np.ndarray], *,
                        rtol: float = 1e-4) -> None:
    """A valid graph whose ONNX Runtime outputs match `before`'s (relative to each output's scale)."""
    assert_valid(after)
    if isinstance(before, Graph):
        before = to_model_proto(before)
    want = run(before, feeds, optimize=False)
    got = run(after, feeds, optimize=False)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert w.shape == g.shape
        scale = max(float(np.abs(w).max()), 1e-6)
        assert float(np.abs(w - g).max()) <= rtol * scale, float(np.abs(w - g).max()) / scale


def rng_array(*shape: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)
