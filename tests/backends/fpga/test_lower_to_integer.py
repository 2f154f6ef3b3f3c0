"""The `lower-to-integer` pass on the synthetic BERT: an integer-only datapath between the first
QuantizeLinear and the last DequantizeLinear, power-of-two scales and shift-only requantization,
ONNX Runtime bit-identical to the program's numpy reference, and clear refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from edgeq.errors import OptionError, PassError
from edgeq.backends.fpga import MatVecLayer, layers_from_onnx
from edgeq.backends.fpga.integer.fixedpoint import pow2_exponent
from edgeq.backends.fpga.integer.program import (Dequantize, GeluInt, IntegerProgram, LayerNormInt, MatMulInt, Quantize, Shift,
                                   check_against_onnxruntime)
from edgeq.ir import Graph, clone_graph, to_model_proto
from edgeq.options import CompileOptions
from edgeq.pipeline import PassManager
from edgeq.backends.fpga.lower_to_integer import LowerToInteger
from edgeq.backends.fpga.metadata import HOST_OPS_KEY
from edgeq.registry import get_pass, get_target
from edgeq.targets.base import validate
from edgeq.pipeline.artifacts import CALIBRATION_DATA, INTEGER_PROGRAM

from tests.passes.helpers import assert_valid, model, ptq_context, ptq_pipeline, vi

FLOAT_COMPUTE = {"MatMul", "Gemm", "Softmax", "LayerNormalization", "Erf", "Gelu", "Sqrt", "Pow", "Tanh",
                 "ReduceMean", "Sigmoid"}
FPGA = get_target("fpga")


def lower(graph: Graph, feeds, path, **kwargs) -> tuple[Graph, IntegerProgram]:
    """The fpga pipeline with lower-to-integer built from `kwargs`."""
    ctx = ptq_context("fpga", path, feeds)
    passes = ptq_pipeline("fpga", CompileOptions(), stop_after="select-precision").passes
    passes += [LowerToInteger(**kwargs), get_pass("dead-code-elimination")(), get_pass("topological-sort")()]
    graph = PassManager(passes)(graph, ctx).graph
    return graph, ctx.artifacts[INTEGER_PROGRAM]


def region(graph: Graph) -> list:
    """Ops downstream of the QuantizeLinear and upstream of the DequantizeLinear."""
    (quantize,) = graph.ops_of_type("QuantizeLinear")
    (dequantize,) = graph.ops_of_type("DequantizeLinear")
    upstream = graph.ancestors(graph.inputs_of(dequantize)[0])
    downstream, stack = set(), list(graph.outputs_of(quantize))
    while stack:
        for reader in graph.consumers(stack.pop()):
            if reader not in downstream:
                downstream.add(reader)
                stack.extend(v for v in graph.outputs_of(reader) if v is not None)
    return [op for op in graph.topo_order() if op in upstream and op in downstream]


@pytest.fixture(scope="module")
def lowered(tmp_path_factory, synthetic_bert, bert_feeds):
    import edgeq

    graph, program = lower(edgeq.load(synthetic_bert), bert_feeds, synthetic_bert)
    return graph, program


def test_the_datapath_is_integer_from_quantize_to_dequantize(lowered) -> None:
    graph, _ = lowered
    assert_valid(graph)
    assert validate(graph, FPGA) == []
    kinds = [op.op_type for op in graph.topo_order()]
    assert kinds.count("QuantizeLinear") == 1 and kinds.count("DequantizeLinear") == 1
    assert "MatMul" not in kinds and kinds.count("MatMulInteger") >= 16
    units = {dict(op.metadata_props).get("edgeq.unit", "") for op in graph.ops_of_type("MatMulInteger")}
    assert sum(u.startswith("linear@") for u in units) == 12  # one unit per float linear layer
    assert sum(u.startswith("attention@") for u in units) == 4  # Q.K^T and P.V per layer
    inside = region(graph)
    assert inside and not {op.op_type for op in inside} & FLOAT_COMPUTE
    for op in inside:
        for value in graph.inputs_of(op) + graph.outputs_of(op):
            if value is not None:
                assert value.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16), (op, value)


def test_host_ops_are_the_embedding_before_the_quantize(lowered) -> None:
    graph, _ = lowered
    host = json.loads(dict(graph.model.metadata_props)[HOST_OPS_KEY])
    names = {entry["name"] for entry in host}
    (quantize,) = graph.ops_of_type("QuantizeLinear")
    assert names == {op.name for op in graph.ancestors(graph.inputs_of(quantize)[0])}
    assert {entry["op_type"] for entry in host} <= {"Gather", "Add", "Shape", "Slice", "Unsqueeze"}
    assert sum(entry["op_type"] == "Gather" for entry in host) == 4  # word, type, position ids, position


def test_onnxruntime_is_bit_identical_to_the_numpy_reference(lowered, bert_feeds) -> None:
    graph, _ = lowered
    check = check_against_onnxruntime(to_model_proto(graph), bert_feeds[0])
    assert check.bit_exact, check.mismatched
    assert check.tensors > 40  # the output and the integer tensor of every lowered float tensor


def test_scales_are_powers_of_two_and_requantization_shifts(lowered) -> None:
    graph, program = lowered
    assert IntegerProgram.from_model(graph).steps == program.steps  # the metadata holds the program

    def pow2(scale) -> bool:
        return all(pow2_exponent(float(s)) is not None for s in np.ravel(scale))

    kinds = {type(step) for step in program.steps}
    assert {Quantize, Dequantize, MatMulInt, Shift, LayerNormInt, GeluInt} <= kinds
    for step in program.steps:
        if isinstance(step, (Quantize, Dequantize)):
            assert pow2(step.scale)
        elif isinstance(step, (LayerNormInt, GeluInt)):
            assert pow2(step.out_scale)
        elif isinstance(step, Shift):
            assert all(isinstance(e, int) for e in np.ravel(step.exponent).tolist())
    for op in graph.ops_of_type("QuantizeLinear", "DequantizeLinear"):
        scale = graph.constant(graph.inputs_of(op)[1]).numpy()
        assert pow2(scale) and not np.any(graph.constant(graph.inputs_of(op)[2]).numpy())


def test_one_scale_per_tensor_without_equalization(synthetic_bert, bert_feeds) -> None:
    import edgeq

    graph, program = lower(edgeq.load(synthetic_bert), bert_feeds, synthetic_bert, equalization=None)
    assert validate(graph, FPGA) == []
    for step in program.steps:
        if isinstance(step, (Quantize, Dequantize)):
            assert isinstance(step.scale, float)
        if isinstance(step, (LayerNormInt, GeluInt)):
            assert isinstance(step.out_scale, float)
    assert check_against_onnxruntime(to_model_proto(graph), bert_feeds[1]).bit_exact


def test_first_norm_on_the_host(synthetic_bert, bert_feeds) -> None:
    import edgeq

    graph, _ = lower(edgeq.load(synthetic_bert), bert_feeds, synthetic_bert, first_norm="host")
    assert validate(graph, FPGA) == []
    host = json.loads(dict(graph.model.metadata_props)[HOST_OPS_KEY])
    assert [e["op_type"] for e in host].count("LayerNormalization") == 1
    assert not {op.op_type for op in region(graph)} & FLOAT_COMPUTE
    assert check_against_onnxruntime(to_model_proto(graph), bert_feeds[0]).bit_exact


@pytest.mark.parametrize("bits, low, high", [(4, -8, 7), (2, -2, 1)])
def test_narrow_weights(synthetic_bert, bert_feeds, bits: int, low: int, high: int) -> None:
    import edgeq

    graph, _ = lower(edgeq.load(synthetic_bert), bert_feeds, synthetic_bert, weight_bits=bits)
    assert validate(graph, FPGA) == []
    for op in graph.ops_of_type("MatMulInteger"):
        weight = graph.constant(graph.inputs_of(op)[1])
        if weight is not None:
            values = weight.numpy()
            assert values.dtype == np.int8 and values.min() >= low and values.max() <= high
    layers = layers_from_onnx(to_model_proto(graph), input_shapes={"input_ids": [1, 16], "attention_mask": [1, 16],
                                                             "token_type_ids": [1, 16]})
    matvecs = [layer for layer in layers if isinstance(layer, MatVecLayer)]
    assert len(matvecs) == 12 and all(layer.weight_bits <= bits for layer in matvecs)
    assert check_against_onnxruntime(to_model_proto(graph), bert_feeds[0]).bit_exact


@pytest.mark.parametrize("kwargs", [{"probability_bits": 8}, {"weight_granularity": "tensor"}])
def test_variants_stay_bit_exact(synthetic_bert, bert_feeds, kwargs) -> None:
    import edgeq

    graph, program = lower(edgeq.load(synthetic_bert), bert_feeds, synthetic_bert, **kwargs)
    assert validate(graph, FPGA) == []
    kinds = {step.kind for step in program.steps}
    assert ("Digit" in kinds) is (kwargs.get("probability_bits", 16) == 16)  # 16-bit P as two digits
    assert check_against_onnxruntime(to_model_proto(graph), bert_feeds[0]).bit_exact


def test_gptq_rounding_stays_on_the_grid(synthetic_bert, bert_feeds) -> None:
    import edgeq

    nearest, _ = lower(edgeq.load(synthetic_bert), bert_feeds, synthetic_bert)
    gptq, _ = lower(edgeq.load(synthetic_bert), bert_feeds, synthetic_bert, weight_rounding="gptq")
    assert validate(gptq, FPGA) == []
    weights = [[graph.constant(graph.inputs_of(op)[1]).numpy() for op in graph.ops_of_type("MatMulInteger")
                if graph.is_const(graph.inputs_of(op)[1])] for graph in (nearest, gptq)]
    assert any(not np.array_equal(a, b) for a, b in zip(*weights))  # GPTQ moved some roundings
    assert check_against_onnxruntime(to_model_proto(gptq), bert_feeds[0]).bit_exact


def test_validate_finds_float_inside_the_datapath(lowered) -> None:
    graph, _ = lowered
    graph = clone_graph(graph)
    (dequantize,) = graph.ops_of_type("DequantizeLinear")
    int8 = graph.inputs_of(dequantize)[0]
    producer = graph.producer(int8)
    # A float detour inside the datapath: int8 -> float -> int8 (Cast, Cast) before the output.
    to_float = graph.add_op("Cast", [graph.outputs_of(producer)[0]], ["detour_float"], attrs={"to": 1},
                            after=producer)
    graph.outputs_of(to_float)[0].set_type(onnx.TensorProto.FLOAT, None)
    back = graph.add_op("Cast", [graph.outputs_of(to_float)[0]], ["detour_int8"], attrs={"to": 3}, after=to_float)
    graph.outputs_of(back)[0].set_type(onnx.TensorProto.INT8, None)
    graph.set_input(dequantize, 0, graph.outputs_of(back)[0])
    problems = validate(graph, FPGA, raise_on_error=False)
    assert any("float" in v.problem and v.node == to_float.name for v in problems)


def test_validate_finds_non_power_of_two_scales_and_zero_points(lowered) -> None:
    graph, _ = lowered
    graph = clone_graph(graph)
    (quantize,) = graph.ops_of_type("QuantizeLinear")
    ins = graph.inputs_of(quantize)
    graph.set_const(ins[1], (graph.constant(ins[1]).numpy() * np.float32(1.5)).astype(np.float32))
    matmul = graph.ops_of_type("MatMulInteger")[0]
    graph.set_input(matmul, 3, graph.add_constant("zero_point", np.array(3, np.int8)))
    problems = [v.problem for v in validate(graph, FPGA, raise_on_error=False)]
    assert any("power of two" in p for p in problems)
    assert any("zero point" in p for p in problems)


def test_an_op_without_an_integer_rule_is_named(tmp_path) -> None:
    import edgeq
    from edgeq.calibration.sources import open_source

    rng = np.random.default_rng(0)
    proto = model([helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1),
                   helper.make_node("MatMul", ["n", "w"], ["h"]),
                   helper.make_node("Relu", ["h"], ["y"])],
                  [vi("x", [1, 4, 8])], [vi("y", [1, 4, 8])],
                  {"g": np.ones(8, np.float32), "b": np.zeros(8, np.float32),
                   "w": rng.standard_normal((8, 8)).astype(np.float32)})
    path = tmp_path / "relu.onnx"
    onnx.save(proto, path)
    ctx = ptq_context("fpga")
    ctx.artifacts[CALIBRATION_DATA] = open_source([{"x": rng.standard_normal((1, 4, 8)).astype(np.float32)}
                                                     for _ in range(3)], str(path))
    with pytest.raises(PassError, match="no integer rule for Relu") as info:
        ptq_pipeline("fpga", CompileOptions())(edgeq.load(path), ctx)
    assert isinstance(info.value.cause, OptionError)
