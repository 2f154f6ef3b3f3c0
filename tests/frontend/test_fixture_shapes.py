"""The front end's shape work on the real exporter fixtures (../shared/fixtures/exports): after
constant-folding and canonicalize-shapes no Shape op feeds a Reshape/Expand of the float datapath,
and ONNX Runtime's outputs equal the original's on the fixtures' inputs and at other sizes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import edgeq
from edgeq.ir import Graph
from edgeq.pipeline import PassContext, PassManager, VerifyInstrument
from edgeq.registry import get_pass
from tests.passes.helpers import assert_valid, run

FIXTURES = ("bert_tiny_torchscript", "bert_tiny_dynamo", "bert_tiny_ort_fused", "llama_tiny_torchscript",
            "llama_tiny_dynamo")
PASSES = ("convert-opset", "identity-elimination", "constant-folding", "canonicalize-shapes",
          "dead-code-elimination", "shape-inference")


def fixture_inputs(shared_dir, name: str) -> dict[str, np.ndarray]:
    data = np.load(shared_dir / "fixtures" / "exports" / f"{name.split('_')[0]}_tiny_io.npz")
    return {k: data[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in data}


def other_sizes(feeds: dict[str, np.ndarray], batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """Inputs like `feeds` at another batch/sequence size (the last row padded at the end)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, array in feeds.items():
        if name == "input_ids":
            out[name] = rng.integers(0, 1000, (batch, seq)).astype(array.dtype)
        elif name == "attention_mask":
            mask = np.ones((batch, seq), array.dtype)
            mask[-1, seq - 2:] = 0
            out[name] = mask
        else:
            out[name] = np.zeros((batch, seq), array.dtype)
    return out


def front_end(path) -> tuple[Graph, dict[str, dict]]:
    graph = edgeq.load(path)
    ctx = PassContext(instruments=[VerifyInstrument()])
    PassManager([get_pass(n)() for n in PASSES])(graph, ctx)
    assert_valid(graph)
    return graph, {r.name: r.stats for r in ctx.records}


def computed_datapath_shapes(graph: Graph) -> list[str]:
    """Reshape/Expand of float data whose shape is computed (a Transpose takes no shape input)."""
    return [f"{op.op_type} {op.name}" for op in graph.ops_of_type("Reshape", "Expand")
            if graph.inputs_of(op)[0].elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
            and not graph.is_const(graph.inputs_of(op)[1])]


@pytest.mark.parametrize("name", FIXTURES)
def test_no_shape_op_feeds_the_datapath_and_outputs_are_unchanged(name, shared_dir):
    path = shared_dir / "fixtures" / "exports" / f"{name}.onnx"
    graph, stats = front_end(path)
    assert computed_datapath_shapes(graph) == []
    rewrites = stats["canonicalize-shapes"]
    assert rewrites["reshapes_to_constant"] >= 8 and rewrites["probes"] == 3
    if "dynamo" in name:
        assert rewrites["chains_to_transpose"] == 2  # each layer's flatten-transpose-unflatten k^T
    for op in graph.ops_of_type("Shape"):  # what is left serves the mask and the positions
        assert all(r.op_type not in ("Reshape", "Expand") or graph.inputs_of(r)[0].elem_type != onnx.TensorProto.FLOAT
                   for r in graph.consumers(graph.outputs_of(op)[0]))
    feeds = fixture_inputs(shared_dir, name)
    original = onnx.load(str(path))
    for sample in (feeds, other_sizes(feeds, 3, 5, 0), other_sizes(feeds, 1, 11, 1)):
        for e, a in zip(run(original, sample, optimize=False), run(graph, sample, optimize=False)):
            assert e.shape == a.shape
            np.testing.assert_allclose(a, e, rtol=0, atol=1e-5)
