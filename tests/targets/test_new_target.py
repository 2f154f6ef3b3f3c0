"""A new target is one module of data: this file declares one (symmetric int8 activations with
power-of-two scales, per-tensor int8 weights, LayerNorm/Softmax/residual adds kept float) using only
targets.base, registers it, compiles the synthetic BERT for it and validates the result against it.
No code outside this file learns about the target."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.compiler import compile as compile_model
from edgeq.options import CompileOptions
from edgeq.registry import _TARGETS, get_target, register_target, targets
from edgeq.targets.base import Granularity, OpRule, QSpec, Target, validate

ACTIVATION = QSpec("int8", symmetric=True, scale_pow2=True)
WEIGHT = QSpec("int8", symmetric=True, granularity=Granularity.TENSOR, scale_pow2=True)
PIPELINE = ("convert-opset", "identity-elimination", "constant-folding", "dead-code-elimination", "shape-inference",
            "select-precision", "calibrate", "insert-qdq", "dead-code-elimination", "topological-sort")

TOY_DSP = Target(
    name="toy-dsp",
    description="a DSP with a symmetric int8 x int8 MAC array and shift-only requantization",
    ops={"MatMul": OpRule(activations=(ACTIVATION, ACTIVATION), weight=WEIGHT, weight_slots=(1,))},
    activation=ACTIVATION,
    weight=WEIGHT,
    activation_dtypes=frozenset({"int8"}),
    keep_high=frozenset({"LayerNorm", "Softmax", "ResidualAdd"}),
    default_pipeline=PIPELINE,
)


@pytest.fixture
def toy_target():
    targets()  # the built-in targets load first, so the registry can be restored exactly
    saved = dict(_TARGETS)
    register_target(TOY_DSP)
    yield get_target("toy-dsp")
    _TARGETS.clear()
    _TARGETS.update(saved)


def _dequantize_scales(graph, weights: bool) -> list[np.ndarray]:
    scales = []
    for op in graph.topo_order():
        if op.op_type != "DequantizeLinear":
            continue
        data, scale = graph.inputs_of(op)[:2]
        if graph.is_const(data) == weights:
            scales.append(graph.constant(scale).numpy())
    return scales


def test_a_target_declared_in_one_module_compiles_and_validates(toy_target, synthetic_bert, bert_feeds):
    compiled = compile_model(synthetic_bert, toy_target, CompileOptions(threads=1), calibration=bert_feeds)
    graph = compiled.graph
    assert validate(graph, toy_target, raise_on_error=False) == []
    assert compiled.report.target == "toy-dsp"
    assert compiled.report.quantized_ops.get("MatMul", 0) > 0
    # What the data declared is what came out: int8 activations with zero point 0, one
    # power-of-two scale per tensor, and per-tensor weights.
    for scales in (_dequantize_scales(graph, weights=False), _dequantize_scales(graph, weights=True)):
        assert scales
        for scale in scales:
            assert scale.size == 1
            assert np.exp2(np.round(np.log2(scale))) == pytest.approx(scale, rel=0)
    zero_points = [graph.constant(graph.inputs_of(op)[2]).numpy() for op in graph.topo_order()
                   if op.op_type == "QuantizeLinear" and len(graph.inputs_of(op)) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    # The x86 target, unchanged, rejects this output: its rules are not the toy target's.
    assert validate(graph, get_target("x86-vnni"), raise_on_error=False)
