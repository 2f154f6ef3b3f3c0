"""bias-correction: each Conv/Gemm bias absorbs the mean output shift its weights' rounding causes,
measured on the calibration inputs; a layer without a bias gets one; the float graph changes by
exactly that shift, and the quantized model's mean output error per channel shrinks."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from edgeq.options import CompileOptions
from tests.passes.helpers import (
    F,
    assert_valid,
    model,
    ptq_context,
    ptq_pipeline,
    run,
    vi,
)

RNG = np.random.default_rng(0)


def _cnn(tmp_path, *, with_bias: bool) -> tuple[str, list[dict]]:
    """x [1, 8, 10, 10] (mean far from 0, as a ReLU's output is) -> Conv 3x3 -> depthwise Conv 3x3 (no padding) ->
    GlobalAveragePool -> Flatten -> Gemm: the mean shifts add up into the pooled features."""
    w1 = RNG.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2
    w2 = RNG.standard_normal((16, 1, 3, 3)).astype(np.float32)
    w3 = RNG.standard_normal((16, 4)).astype(np.float32)
    inits = {"w1": w1, "w2": w2, "w3": w3, "c3": np.zeros(4, np.float32)}
    conv1 = ["x", "w1", "b1"] if with_bias else ["x", "w1"]
    if with_bias:
        inits["b1"] = RNG.standard_normal(16).astype(np.float32)
    nodes = [helper.make_node("Conv", conv1, ["h1"]),
             helper.make_node("Conv", ["h1", "w2"], ["h2"], group=16),
             helper.make_node("GlobalAveragePool", ["h2"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "c3"], ["y"])]
    path = tmp_path / f"cnn_{with_bias}.onnx"
    onnx.save(model(nodes, [vi("x", [1, 8, 10, 10])], [vi("y", [1, 4], F)], inits, opset=21, ir_version=10), str(path))
    feeds = [{"x": (RNG.random((1, 8, 10, 10)) * 3 + 1).astype(np.float32)} for _ in range(6)]
    return str(path), feeds


def _compile(path: str, feeds, *, correct: bool):
    from edgeq.ir import load

    skip = () if correct else ("bias-correction",)
    ctx = ptq_context("qnn-htp", path, feeds)
    result = ptq_pipeline("qnn-htp", CompileOptions(), skip=skip)(load(path), ctx)
    return result.graph, ctx


def test_the_corrected_model_has_less_mean_output_error_and_stays_valid(tmp_path):
    for with_bias in (True, False):
        path, feeds = _cnn(tmp_path, with_bias=with_bias)
        corrected, ctx = _compile(path, feeds, correct=True)
        plain, _ = _compile(path, feeds, correct=False)
        assert_valid(corrected)
        record = next(r for r in ctx.records if r.name == "bias-correction")
        assert record.stats["layers"] == 3  # both Convs (the first given a bias if it had none) and the Gemm
        errors = {}
        for name, graph in (("corrected", corrected), ("plain", plain)):
            # Unoptimized: ORT's CPU fusions compute the 16-bit QDQ Gemm less exactly than the model says.
            diffs = np.stack([run(graph, f, optimize=False)[0] - run(path, f, optimize=False)[0] for f in feeds])
            errors[name] = float(np.abs(diffs.mean(axis=0)).mean())
        assert errors["corrected"] < 0.5 * errors["plain"], errors


def test_without_calibration_data_nothing_changes(tmp_path):
    from edgeq.ir import load
    from edgeq.pipeline import PassContext
    from edgeq.pipeline.artifacts import QUANT_PLAN
    from edgeq.quant.plan import QuantPlan
    from edgeq.registry import get_pass

    path, _ = _cnn(tmp_path, with_bias=True)
    ctx = PassContext()
    ctx.artifacts[QUANT_PLAN] = QuantPlan(scheme=None, roles=None)
    result = get_pass("bias-correction")().run(load(path), ctx)
    assert not result.modified and result.stats == {"layers": 0}
