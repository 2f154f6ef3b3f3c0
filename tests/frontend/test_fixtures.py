"""The five exporter fixtures (../shared/fixtures/exports) end to end through the target's
preprocessing and `canonicalize`: no com.microsoft op left, every LayerNorm a LayerNormalization,
every GELU a Gelu, RMSNorms in the builder form, one scale on the scores, the canonical mask
shared by every layer, no NaN guard; outputs equal to PyTorch's and to the graph before the pass,
on the fixtures' inputs and on other sizes."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.frontend.rules.mask import canonical_kind
from edgeq.ir import load
from edgeq.pipeline import PassContext, PassManager
from edgeq.registry import get_pass
from tests.frontend.graphs import PREPROCESS, canonicalize, kinds
from tests.passes.helpers import assert_valid, run

FIXTURES = {  # name: (family, mask kind, rewrites the pass must report)
    "bert_tiny_torchscript": ("bert", "key-padding", {"gelu-formula": 2, "attention-scale": 2,
                                                      "attention-key-transpose": 2}),
    "bert_tiny_dynamo": ("bert", "key-padding", {"attention-scale": 2}),
    "bert_tiny_ort_fused": ("bert", "key-padding", {"layer-norm-skip": 4, "gelu-com-microsoft": 2,
                                                    "attention-key-transpose": 2}),
    "llama_tiny_torchscript": ("llama", "causal+padding", {"rms-norm-decomposed": 5, "attention-scale": 2}),
    "llama_tiny_dynamo": ("llama", "causal+padding", {"attention-scale": 2}),
}


def _preprocessed(path):
    graph = load(path)
    PassManager([get_pass(name)() for name in PREPROCESS])(graph, PassContext())
    return graph


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def fixture(request, shared_dir):
    name = request.param
    exports = shared_dir / "fixtures" / "exports"
    before = _preprocessed(exports / f"{name}.onnx")
    after, stats = canonicalize(_preprocessed(exports / f"{name}.onnx"))
    io = dict(np.load(exports / f"{FIXTURES[name][0]}_tiny_io.npz"))
    return name, before, after, stats, io


def test_every_concept_is_in_its_canonical_form(fixture):
    name, _, graph, stats, _ = fixture
    family, mask_kind, rewrites = FIXTURES[name]
    assert_valid(graph)
    assert not any(op.domain for op in graph.ops()), "a com.microsoft op is left"
    assert not any(key.startswith(("left as is", "mask unrecognised")) or "refused" in key for key in stats), stats
    for rule, count in rewrites.items():
        assert stats[rule] == count, stats
    assert stats[f"mask {mask_kind}"] == 2 and stats["attention-nan-guard"] == 2
    found = kinds(graph)
    assert "IsNaN" not in found and "Erf" not in found and "Tanh" not in found
    if family == "bert":
        assert found["LayerNormalization"] == 5 and found["Gelu"] == 2 and "ReduceMean" not in found
    else:
        assert found["Reciprocal"] == 5 and found["ReduceMean"] == 5 and "LayerNormalization" not in found
        for reciprocal in graph.ops_of_type("Reciprocal"):  # Mul(gamma, Mul(x, Reciprocal(Sqrt(...))))
            (normalize,) = graph.consumers(graph.outputs_of(reciprocal)[0])
            (scale,) = graph.consumers(graph.outputs_of(normalize)[0])
            assert graph.producer(graph.inputs_of(reciprocal)[0]).op_type == "Sqrt"
            assert scale.op_type == "Mul" and graph.is_const(graph.inputs_of(scale)[0])
    biases = set()
    for softmax in graph.ops_of_type("Softmax"):
        add = graph.producer(graph.inputs_of(softmax)[0])
        scaled, bias = graph.inputs_of(add)
        scale = graph.producer(scaled)
        assert add.op_type == "Add" and scale.op_type == "Mul" and graph.producer(
            graph.inputs_of(scale)[0]).op_type == "MatMul"
        assert canonical_kind(graph, bias) == mask_kind
        biases.add(bias.name)
    assert len(biases) == 1


def test_outputs_match_pytorch(fixture):
    name, _, graph, _, io = fixture
    output = graph.outputs[0].name
    got = run(graph, {v.name: io[v.name] for v in graph.inputs if v.const is None})[0]
    want = io[output]
    assert float(np.abs(got - want).max()) <= 1e-4 * float(np.abs(want).max())


@pytest.mark.parametrize("side", ["end", "start"])
def test_outputs_match_the_graph_before_the_pass_on_other_sizes(fixture, side):
    name, before, after, _, _ = fixture
    rng = np.random.default_rng(0)
    batch, seq = 3, 7
    mask = np.ones((batch, seq), np.int64)
    for row, pad in enumerate((0, 2, 4)):
        if pad:
            mask[row, slice(seq - pad, None) if side == "end" else slice(0, pad)] = 0
    feeds = {"input_ids": rng.integers(0, 1000, (batch, seq)), "attention_mask": mask,
             "token_type_ids": np.zeros((batch, seq), np.int64)}
    feeds = {v.name: feeds[v.name] for v in after.inputs if v.const is None}
    want, got = run(before, feeds)[0], run(after, feeds)[0]
    rows = mask.astype(bool)  # decoders: padded queries at the start attend to nothing (see mask.py)
    if FIXTURES[name][0] == "bert" or side == "end":
        rows = np.ones_like(rows)
    assert float(np.abs(got[rows] - want[rows]).max()) <= 1e-4 * float(np.abs(want[rows]).max())


def test_a_second_run_changes_nothing(fixture):
    _, _, graph, _, _ = fixture
    result = get_pass("canonicalize")()(graph, PassContext())
    assert not result.modified and dict(result.stats) == {"mask already canonical": 2}
