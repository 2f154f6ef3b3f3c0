"""Decoders with a KV cache through the front end: probing sizes the total sequence as past +
new (and one batch however the exporter names it), so the shape ops of torch.onnx exports with
a cache are rewritten and the graph still computes what PyTorch did."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeq.frontend.probing import make_probes, sequence_sums
from edgeq.ir import load
from edgeq.models import synthetic
from edgeq.options import CompileOptions
from edgeq.pipeline import PassContext, PassManager
from edgeq.registry import get_pass, get_target
from tests.passes.helpers import assert_valid, run

DATA = Path(__file__).parent / "data"
FRONT = ("convert-opset", "identity-elimination", "constant-folding", "canonicalize", "canonicalize-shapes",
         "dead-code-elimination")


def _front_end(path: Path):
    target = get_target("x86-vnni")
    passes = [get_pass(n).from_options(CompileOptions(), target) if hasattr(get_pass(n), "from_options")
              else get_pass(n)() for n in FRONT]
    ctx = PassContext(target=target)
    graph = PassManager(passes)(load(path), ctx).graph
    stats = {r.name: r.stats for r in ctx.records}
    return graph, stats


def test_named_sum_dim_is_the_sum_of_its_parts(tmp_path):
    path = synthetic.build_llama_file(tmp_path / "kv.onnx", kv_cache=True)
    graph = load(path)
    assert sequence_sums(graph) == {"past_sequence + sequence": ("past_sequence", "sequence")}
    for probe in make_probes(graph):
        feeds = probe.feeds
        assert feeds["attention_mask"].shape[1] == feeds["input_ids"].shape[1] + feeds["past_key_values.0.key"].shape[2]


def test_dynamo_dims_named_per_input_are_tied_together():
    graph = load(DATA / "llama_kv_dynamo.onnx")
    sums = sequence_sums(graph)
    mask = next(v for v in graph.inputs if v.name == "attention_mask")
    tokens = next(v for v in graph.inputs if v.name == "input_ids")
    assert len(sums[mask.shape[1]]) == 2            # total = past + new
    assert sums[mask.shape[0]] == (tokens.shape[0],)  # one batch
    for probe in make_probes(graph):
        batch = probe.feeds["input_ids"].shape[0]
        assert {f.shape[0] for f in probe.feeds.values()} == {batch}


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_shape_ops_of_exports_with_a_cache_are_rewritten_and_outputs_kept(exporter):
    path = DATA / f"llama_kv_{exporter}.onnx"
    graph, stats = _front_end(path)
    shapes = stats["canonicalize-shapes"]
    assert shapes["probes"] == 3 and "left_probe_failed" not in shapes
    assert shapes["reshapes_to_constant"] >= 8  # the q/k/v head splits and merges of both layers
    assert "mask causal+padding" in stats["canonicalize"]
    assert_valid(graph)
    assert not [op for op in graph.ops() if op.op_type == "Shape"
                and any(c.op_type in ("Reshape", "Expand") for v in graph.outputs_of(op) for c in graph.consumers(v))]
    io = np.load(DATA / f"llama_kv_{exporter}_io.npz")
    from edgeq.ir import to_model_proto

    model = to_model_proto(graph)
    outputs = run(model, {i.name: io[i.name] for i in model.graph.input})
    for out, value in zip(model.graph.output, outputs):
        np.testing.assert_allclose(value, io[out.name], atol=2e-5)
