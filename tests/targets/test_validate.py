"""`validate(graph, target)`: every Q/DQ against everything its target declares.

Each rule has a test that breaks exactly that rule in a small hand-built graph (a quantized
linear layer, an embedding table) and checks the one violation names it; the presets' outputs
(every scheme the x86 targets compile) pass."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeq
from edgeq.compiler import compile
from edgeq.errors import ValidationError
from edgeq.options import CompileOptions
from edgeq.registry import get_target
from edgeq.targets.base import Granularity, OpRule, QSpec, Target, validate

K, N = 64, 32
RNG = np.random.default_rng(0)
WEIGHT_Q = RNG.integers(-127, 128, size=(K, N)).astype(np.int8)
ACT = QSpec("uint8", symmetric=False)
W8 = QSpec("int8", symmetric=True, granularity=Granularity.CHANNEL, block_sizes=(32, 64))
W4 = QSpec("int4", symmetric=True, granularity=Granularity.BLOCK, axis=0, block_size=32, block_sizes=(32, 64))


def _target(activation: QSpec = ACT, weight: QSpec = W8, embedding: QSpec | None = None, **fields) -> Target:
    """A target declared here alone: MatMul in integer with these specs, int4 block-wise weights."""
    ops = {"MatMul": OpRule(activations=(activation, activation), weight=weight)}
    if embedding is not None:
        ops["Gather"] = OpRule(weight=embedding, weight_slots=(0,))
    return Target(name="test-validate", description="declared in the test", ops=ops, activation=activation,
                  weight=weight, weight_specs={"int4": W4},
                  activation_dtypes=frozenset({"uint8", "int8", "uint16"}), **fields)


TARGET = _target()


def _linear(*, weight: np.ndarray | None = WEIGHT_Q, weight_dtype: int = TensorProto.INT8,
            weight_scale: np.ndarray | None = None, weight_zero: np.ndarray | None = None,
            weight_attrs: dict | None = None, act_scale: float = 0.05, act_zero: np.ndarray | None = None
            ) -> edgeq.ir.Graph:
    """x[2, K] -> Q -> DQ -> MatMul <- DQ(weight[K, N]) -> y: one quantized linear layer. The
    defaults satisfy TARGET (uint8 asymmetric activations, int8 symmetric per-channel weights)."""
    weight_scale = np.full((N,), 0.01, np.float32) if weight_scale is None else weight_scale
    weight_zero = np.zeros(weight_scale.shape, np.int8) if weight_zero is None else weight_zero
    act_zero = np.array(128, np.uint8) if act_zero is None else act_zero
    weight_tensor = helper.make_tensor("w", weight_dtype, weight.shape, weight.flatten().tolist())
    zero_tensor = helper.make_tensor("wz", weight_dtype, weight_zero.shape, weight_zero.flatten().tolist())
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="quantize"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dequantize"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="weight_dequantize",
                              **({"axis": 1} if weight_attrs is None else weight_attrs)),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="linear")]
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, N])],
        [numpy_helper.from_array(np.array(act_scale, np.float32), "xs"), numpy_helper.from_array(act_zero, "xz"),
         weight_tensor, numpy_helper.from_array(weight_scale, "ws"), zero_tensor])
    return edgeq.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), check_runtime=False)


def _int4_blocked(block: int = 32, scale_rows: int | None = None) -> edgeq.ir.Graph:
    q = RNG.integers(-8, 8, size=(K, N)).astype(np.int8)
    rows = K // block if scale_rows is None else scale_rows
    return _linear(weight=q, weight_dtype=TensorProto.INT4, weight_scale=np.full((rows, N), 0.01, np.float32),
                   weight_attrs={"axis": 0, "block_size": block})


def _only(graph, target: Target = TARGET) -> str:
    """The one violation of `graph` (exactly one rule is broken)."""
    violations = validate(graph, target, raise_on_error=False)
    assert len(violations) == 1, violations
    return violations[0].problem


def test_the_reference_graphs_are_valid():
    assert validate(_linear(), TARGET) == []
    assert validate(_int4_blocked(), TARGET) == []
    assert validate(_linear(weight_attrs={"axis": 0, "block_size": 32},
                            weight_scale=np.full((2, N), 0.01, np.float32)), TARGET) == []  # int8 --group


def test_a_violation_raises_one_line_naming_the_first_and_the_count():
    graph = _linear(weight_zero=np.full((N,), 3, np.int8), act_zero=np.array(7, np.int8))
    with pytest.raises(ValidationError) as info:
        validate(graph, dataclasses.replace(TARGET, activation_dtypes=frozenset({"uint8"})))
    message = str(info.value)
    assert "\n" not in message and message.startswith("3 violation(s) of target test-validate; first: ")


# ---- dtype ---------------------------------------------------------------------------------


def test_dtype_the_target_lacks():
    graph = _linear(weight=np.clip(WEIGHT_Q, 0, 15).astype(np.uint8), weight_dtype=TensorProto.UINT4,
                    weight_zero=np.zeros((N,), np.uint8))
    assert _only(graph) == "dtype uint4 is not supported by target test-validate"


def test_weight_dtype_that_is_only_an_activation_dtype():
    graph = _linear(weight=WEIGHT_Q.astype(np.uint8), weight_dtype=TensorProto.UINT8,
                    weight_zero=np.zeros((N,), np.uint8))
    assert _only(graph) == "weight dtype uint8 is not one of int4, int8"


def test_activation_dtype_the_target_lacks():
    target = dataclasses.replace(TARGET, activation_dtypes=frozenset({"uint8"}), weight_specs={})
    graph = _linear(act_zero=np.array(0, np.int8))
    problems = [v.problem for v in validate(graph, target, raise_on_error=False)]
    # the Q and the DQ of the activation both carry it
    assert problems == ["activation dtype int8 is not one of uint8"] * 2


# ---- range ---------------------------------------------------------------------------------


def test_stored_weight_values_outside_the_qrange():
    target = _target(weight=W8.replace(qrange=(-64, 63)))
    assert _only(_linear(), target) == f"stored values {WEIGHT_Q.min()}..{WEIGHT_Q.max()} are outside the " \
                                       "target's range -64..63"
    assert validate(_linear(weight=(WEIGHT_Q // 2).astype(np.int8)), target) == []


def test_zero_point_outside_the_qrange():
    target = _target(activation=ACT.replace(qrange=(0, 127)))  # 7-bit activations (ORT's reduce_range)
    assert validate(_linear(act_zero=np.array(100, np.uint8)), target) == []
    problems = [v.problem for v in validate(_linear(act_zero=np.array(200, np.uint8)), target, raise_on_error=False)]
    assert problems == ["zero point 200 is outside the target's range 0..127"] * 2


# ---- granularity and block size ------------------------------------------------------------


def test_one_scale_per_tensor_where_the_target_takes_one_per_channel():
    graph = _linear(weight_scale=np.array(0.01, np.float32), weight_zero=np.array(0, np.int8), weight_attrs={})
    assert _only(graph) == "weight quantized with one scale per tensor; the target takes one scale per channel"


def test_one_scale_per_channel_where_the_target_takes_one_per_tensor():
    target = _target(weight=W8.replace(granularity=Granularity.TENSOR, block_sizes=()))
    assert _only(_linear(), target) == "weight quantized with one scale per channel; the target takes one scale " \
                                      "per tensor"


def test_channel_scales_that_do_not_match_the_channels():
    graph = _linear(weight_scale=np.full((N - 1,), 0.01, np.float32))
    assert _only(graph) == f"scale shape ({N - 1},) is not one scale per channel of axis 1 ({N})"


def test_block_wise_scales_where_the_target_takes_no_blocks():
    target = _target(weight=W8.replace(block_sizes=()))
    graph = _linear(weight_attrs={"axis": 0, "block_size": 32}, weight_scale=np.full((2, N), 0.01, np.float32))
    assert _only(graph, target) == "block-wise weight scales (block 32); the target takes one scale per channel"


def test_block_scales_whose_shape_is_not_the_blocked_shape():
    assert _only(_int4_blocked(scale_rows=3)) == f"scale shape (3, {N}) is not the blocked shape (2, {N}) of " \
                                                 "block size 32 along axis 0"


def test_block_size_the_target_does_not_accept():
    assert _only(_int4_blocked(block=16)) == "block size 16 is not one the target accepts (32, 64)"


def test_per_channel_int4_where_the_target_takes_blocks():
    graph = _linear(weight=RNG.integers(-8, 8, size=(K, N)).astype(np.int8), weight_dtype=TensorProto.INT4)
    assert _only(graph) == "weight quantized with one scale per channel; the target takes block-wise scales"


# ---- scales and zero points ----------------------------------------------------------------


def test_scale_that_is_not_a_power_of_two():
    target = _target(weight=W8.replace(scale_pow2=True))
    assert _only(_linear(), target) == "scale is not a power of two"  # 0.01
    assert validate(_linear(weight_scale=np.full((N,), 2.0**-7, np.float32)), target) == []


def test_negative_scale_without_signed_weight_scales():
    scale = np.full((N,), 0.01, np.float32)
    scale[3] = -0.01
    assert _only(_linear(weight_scale=scale)) == "scale is not positive; the target takes positive scales only"
    assert validate(_linear(weight_scale=scale), dataclasses.replace(TARGET, signed_weight_scales=True)) == []


def test_nonzero_zero_point_of_a_symmetric_signed_spec():
    zero = np.zeros((N,), np.int8)
    zero[5] = 3
    assert _only(_linear(weight_zero=zero)) == "zero point is not 0 but the target needs symmetric quantization"


def test_uncentred_zero_point_of_a_symmetric_unsigned_spec():
    target = _target(activation=QSpec("uint8", symmetric=True))
    assert validate(_linear(act_zero=np.array(128, np.uint8)), target) == []
    problems = [v.problem for v in validate(_linear(act_zero=np.array(120, np.uint8)), target, raise_on_error=False)]
    assert problems == ["zero point is not 128 but the target needs symmetric quantization"] * 2


def test_scale_and_zero_point_other_than_the_fixed_ones():
    target = _target(activation=ACT.replace(fixed=(1 / 256, 0)))
    assert validate(_linear(act_scale=1 / 256, act_zero=np.array(0, np.uint8)), target) == []
    problems = [v.problem for v in validate(_linear(), target, raise_on_error=False)]  # 0.05, 128
    assert problems == ["scale and zero point are not the fixed (0.00390625, 0) the target imposes"] * 2


# ---- embedding tables ----------------------------------------------------------------------


def _embedding(table: np.ndarray) -> edgeq.ir.Graph:
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"], name="embedding"),
             helper.make_node("Cast", ["rows"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "embedding", [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, table.shape[1]])],
                              [numpy_helper.from_array(table, "table")])
    return edgeq.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), check_runtime=False)


def test_embedding_table_in_a_dtype_the_target_lacks():
    table = RNG.integers(-300, 300, size=(10, 8)).astype(np.int16)
    assert _only(_embedding(table)) == "embedding dtype int16 is not supported by test-validate"


def test_embedding_values_outside_the_qrange():
    target = _target(embedding=QSpec("int8", granularity=Granularity.CHANNEL, qrange=(-127, 127)))
    table = RNG.integers(-127, 128, size=(10, 8)).astype(np.int8)
    assert validate(_embedding(table), target) == []
    table[2, 3], table[4, 5] = -128, 127
    assert _only(_embedding(table), target) == "stored embedding values -128..127 are outside the target's range " \
                                               "-127..127"


# ---- what the presets produce ----------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled_llama(synthetic_llama, llama_samples):
    def get(target: str, **options):
        return compile(synthetic_llama, target, CompileOptions(verify=False, **options), calibration=llama_samples)
    return get


def _weight_dqs(graph, elem: int) -> list:
    return [dq for dq in graph.ops_of_type("DequantizeLinear")
            if graph.constant(graph.inputs_of(dq)[0]) is not None
            and graph.constant(graph.inputs_of(dq)[0]).elem_type == elem]


@pytest.mark.parametrize("target", ["x86-vnni", "x86-avx2"])
def test_int4_blocks_with_the_int8_lm_head_are_valid(compiled_llama, target):
    result = compiled_llama(target, weights="int4", group=32, activations="int8", rotate=False)  # W4A8
    graph = result.graph
    assert any(dq.attr("block_size") == 32 for dq in _weight_dqs(graph, TensorProto.INT4))
    assert [dq for dq in _weight_dqs(graph, TensorProto.INT8) if dq.attr("block_size") is None]  # the LM head
    assert validate(graph, result.target) == []


def test_int8_weight_only_with_a_group_is_valid(compiled_llama):
    result = compiled_llama("x86-avx2", weights="int8", group=16, activations="float")
    blocked = [dq for dq in _weight_dqs(result.graph, TensorProto.INT8) if dq.attr("block_size") == 16]
    assert blocked and validate(result.graph, result.target) == []
    # the avx2 block-wise int8 weights keep its 7-bit range
    assert all(np.abs(result.graph.constant(result.graph.inputs_of(dq)[0]).numpy().astype(int)).max() <= 64
               for dq in blocked)


def test_two_digit_activations_are_valid(compiled_llama):
    result = compiled_llama("x86-vnni", two_digit=("down_proj",))
    residual = [q for q in result.graph.ops_of_type("QuantizeLinear") if "residual" in q.name
                or "residual" in result.graph.outputs_of(q)[0].name]
    assert residual and validate(result.graph, result.target) == []


def test_a_preset_output_fails_a_stricter_target(compiled_llama):
    """The presets' acceptance is not vacuous: the same graph breaks a target without int4 blocks."""
    result = compiled_llama("x86-vnni", weights="int4", activations="float", rotate=False, group=32)
    strict = dataclasses.replace(get_target("x86-vnni"), weight_specs={"int4": QSpec(
        "int4", symmetric=True, granularity=Granularity.BLOCK, axis=0, block_size=64)})
    problems = {v.problem for v in validate(result.graph, strict, raise_on_error=False)}
    assert problems == {"block size 32 is not one the target accepts (64)"}
