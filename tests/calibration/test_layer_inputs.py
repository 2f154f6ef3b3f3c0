"""Layer-input statistics from the float model: H = 2/n X^T X and mean |x| exact against numpy,
weights substituted for later runs, Hessians chunked to a byte budget."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.calibration.layer_inputs import ActivationStream, hessian_chunks, input_statistics, input_width
from edgeq.ir import load
from edgeq.quant.linears import Linear, LinearGroup
from edgeq.targets.base import QSpec
from tests.calibration.helpers import mlp_samples
from tests.calibration.models import mlp, mlp_reference


@pytest.fixture(scope="module")
def graph():
    return load(mlp())


def test_input_statistics_match_numpy(graph):
    samples = mlp_samples(6)
    model = mlp()
    tokens = {name: np.concatenate([mlp_reference(model, s["x"])[name] for s in samples]) for name in ("x", "r")}
    with ActivationStream(graph, samples, threads=1) as stream:
        stats = input_statistics(stream, ["x", "r", "x"], abs_mean=True)
        assert stream.passes == 1  # both tensors in one pass over the data
    assert list(stats) == ["x", "r"]
    for name, x in tokens.items():
        x = x.astype(np.float64)
        assert stats[name].tokens == len(x)
        np.testing.assert_allclose(stats[name].hessian, 2 * x.T @ x / len(x), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats[name].abs_mean, np.abs(x).mean(axis=0), rtol=1e-5, atol=1e-6)


def test_substituted_weights_feed_later_runs(graph):
    samples = mlp_samples(3)
    with ActivationStream(graph, samples, threads=1) as stream:
        assert stream.substitute("w1", np.zeros((32, 64), np.float32))
        assert not stream.substitute("w2", np.zeros((64, 4), np.float32))  # small: inline, not fed
        assert not stream.substitute("w1", np.zeros((2, 2), np.float32))  # wrong shape
        (hidden,) = next(stream.samples(["h"]))
    assert hidden.shape[1] == 64 and not hidden.any()


def test_hessian_chunks_fit_the_budget(graph):
    spec = QSpec("int8")
    first, second = (LinearGroup(graph.inputs_of(op)[0].name, [Linear(op, spec, False)])
                     for op in graph.ops_of_type("MatMul"))
    assert (input_width(graph, first), input_width(graph, second)) == (32, 64)
    assert hessian_chunks([first, second], graph, 8 * (32 * 32 + 64 * 64)) == [[first, second]]
    assert hessian_chunks([first, second], graph, 8 * 64 * 64) == [[first], [second]]
    assert hessian_chunks([first, second], graph, 1) == [[first], [second]]  # at least one each
