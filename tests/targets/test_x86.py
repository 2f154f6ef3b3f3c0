"""The x86 targets as data: their specs, what the quantization scheme reads from them, avx2's
7-bit weights under validate, and their cost models pricing a compiled model's work."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeq
from edgeq.compiler import compile
from edgeq.errors import CostModelError, OptionError, ValidationError
from edgeq.options import CompileOptions
from edgeq.quant.plan import Scheme
from edgeq.registry import get_target
from edgeq.targets.base import Granularity, QSpec, validate
from edgeq.targets.x86 import MATMULNBITS_BLOCKS

X86 = ("x86-vnni", "x86-avx2", "x86-amx")


# ---- specs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", X86)
def test_x86_specs(name):
    target = get_target(name)
    assert target.activation == QSpec("uint8", symmetric=False)                  # U8 activations, per tensor
    weight = target.weight
    assert (weight.dtype, weight.symmetric, weight.granularity) == ("int8", True, Granularity.CHANNEL)
    int4 = target.weight_spec("int4")
    assert (int4.dtype, int4.symmetric, int4.granularity, int4.axis, int4.block_size) == \
        ("int4", True, Granularity.BLOCK, 0, 128)
    # block sizes: what ORT's DQ -> MatMulNBits fusion takes, a power of two from 16
    for spec in (weight, int4):
        assert spec.accepted_block_sizes == MATMULNBITS_BLOCKS
    assert MATMULNBITS_BLOCKS[0] == 16 and all(b & (b - 1) == 0 for b in MATMULNBITS_BLOCKS)
    assert target.weight_dtypes == {"int8", "int4", "nf4", "float8e4m3fn"}
    assert target.activation_dtypes == {"uint8", "int8", "uint16", "int16", "float8e4m3fn"}
    for kind in ("MatMul", "Gemm", "Conv"):
        assert target.rule(kind).weight == weight
    for kind in ("Gemm", "Conv"):
        bias = target.rule(kind).bias
        assert (bias.dtype, bias.granularity, bias.axis) == ("int32", Granularity.CHANNEL, 0)
    assert target.rule("Gather").weight.block_sizes == ()     # embedding tables are never block-wise
    assert not hasattr(target, "high_dtype")


def test_avx2_weights_are_7_bit_and_the_others_8_bit():
    avx2 = get_target("x86-avx2").weight
    assert (avx2.qmin, avx2.qmax, avx2.bits) == (-64, 63, 7)
    for name in ("x86-vnni", "x86-amx"):
        assert (get_target(name).weight.qmin, get_target(name).weight.qmax, get_target(name).weight.bits) == \
            (-128, 127, 8)


def test_amx_runs_kept_high_ops_in_bf16_on_openvino_and_float32_on_the_cpu_provider():
    amx = get_target("x86-amx")
    assert amx.execution_named("openvino").high_precision == "bfloat16"
    assert amx.execution_named("openvino").device_config.precision_hint == "bf16"
    assert amx.execution_named("cpu").high_precision == "float32"
    (note,) = [n for n in amx.notes if "BF16" in n]
    assert "so under it they run in float32" in note


# ---- the scheme reads the target ------------------------------------------------------------


def test_scheme_takes_int4_defaults_from_the_target():
    base = get_target("x86-vnni")
    scheme = Scheme.resolve(base, CompileOptions(weights="int4", activations="float"))
    assert scheme.rules["MatMul"].weight == base.weight_spec("int4") and scheme.label == "W4 weight-only g128"
    assert scheme.head_weight == base.weight                       # the LM head stays int8
    # another target's int4 data: group 64, asymmetric
    int4 = dataclasses.replace(base.weight_spec("int4"), block_size=64, symmetric=False)
    other = dataclasses.replace(base, name="test-x86-g64", weight_specs={"int4": int4})
    scheme = Scheme.resolve(other, CompileOptions(weights="int4"))
    assert scheme.rules["Gemm"].weight == int4 and scheme.label == "W4A8 g64"
    assert Scheme.resolve(other, CompileOptions(weights="int4", group=32)).rules["MatMul"].weight.block_size == 32


def test_scheme_refuses_a_group_the_target_does_not_accept():
    base = get_target("x86-vnni")
    narrow = dataclasses.replace(base, name="test-x86-narrow",
                                 weight_specs={"int4": base.weight_spec("int4").replace(block_sizes=(32,))})
    with pytest.raises(OptionError, match="int4 weights take no block size 64 on this target"):
        Scheme.resolve(narrow, CompileOptions(weights="int4", group=64))
    with pytest.raises(OptionError, match="int8 weights are channel-wise on this target, not blocks"):
        Scheme.resolve(dataclasses.replace(base, weight=base.weight.replace(block_sizes=())),
                       CompileOptions(group=32))


def test_avx2_grouped_int8_weights_keep_their_7_bits():
    scheme = Scheme.resolve(get_target("x86-avx2"), CompileOptions(group=64, activations="float"))
    weight = scheme.rules["MatMul"].weight
    assert (weight.granularity, weight.axis, weight.block_size, weight.qrange) == \
        (Granularity.BLOCK, 0, 64, (-64, 63))
    assert scheme.label == "W7 weight-only g64"


# ---- a tiny model, compiled and estimated ---------------------------------------------------

SEQ, HIDDEN, INNER, OUT = 4, 16, 8, 4
# MACs by hand: [SEQ, HIDDEN] x [HIDDEN, INNER] and [SEQ, INNER] x [INNER, OUT]
MACS = SEQ * HIDDEN * INNER + SEQ * INNER * OUT          # 640


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """x[batch, 4, 16] -> MatMul -> Relu -> MatMul -> y[batch, 4, 4], and its calibration samples."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SEQ, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SEQ, OUT])],
        [numpy_helper.from_array(rng.standard_normal((HIDDEN, INNER)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.standard_normal((INNER, OUT)).astype(np.float32), "w2")])
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    samples = [{"x": rng.standard_normal((1, SEQ, HIDDEN)).astype(np.float32)} for _ in range(8)]
    return path, samples


@pytest.fixture(scope="module")
def compiled_tiny(tiny, tmp_path_factory):
    path, samples = tiny
    out = {}
    for name in X86:
        result = compile(path, name, CompileOptions(verify=False), calibration=samples)
        out[name] = tmp_path_factory.mktemp(name) / "tiny.onnx"
        result.save(out[name])
    return out


def test_avx2_validate_rejects_an_8_bit_weight_value(compiled_tiny):
    graph = edgeq.load(compiled_tiny["x86-avx2"])
    target = get_target("x86-avx2")
    assert validate(graph, target) == []
    dq = next(dq for dq in graph.ops_of_type("DequantizeLinear") if graph.is_const(graph.inputs_of(dq)[0]))
    weights = graph.inputs_of(dq)[0]
    values = graph.constant(weights).numpy().copy()
    assert values.min() >= -64 and values.max() <= 63
    values[0, 0] = 100                                            # 8 bits: fine on vnni, not on avx2
    graph.set_const(weights, values)
    with pytest.raises(ValidationError, match=r"1 violation\(s\) of target x86-avx2; first: .*stored values "
                                              r"-?\d+\.\.100 are outside the target's range -64\.\.63"):
        validate(graph, target)
    assert validate(graph, get_target("x86-vnni")) == []


@pytest.mark.parametrize("name,macs_per_cycle", [("x86-vnni", 64), ("x86-avx2", 32), ("x86-amx", 1024)])
def test_estimate_counts_the_macs_by_hand_and_prices_them(compiled_tiny, name, macs_per_cycle):
    report = get_target(name).cost_model.estimate(compiled_tiny[name], input_shapes={"x": [1, SEQ, HIDDEN]})
    assert report.counts == {
        "op_mac_uint8_int8": MACS,                                  # U8 activations x int8 weights
        "weight_bytes_int8": HIDDEN * INNER + INNER * OUT,          # 160: one byte a weight
        "activation_bytes_uint8": SEQ * HIDDEN + SEQ * INNER,       # 96: what the two matmuls read
    }
    assert report.costs == {"op_mac_uint8_int8": MACS / macs_per_cycle}
    assert report.total == MACS / macs_per_cycle and report.unit == "cycles on one core (peak)"
    assert report.clock_hz is None and report.seconds is None         # no clock declared, none invented
    text = report.to_text()
    assert f"{MACS:,} MACs" in text and "no memory bound" in text and "declares no clock" in text
    data = report.to_dict()
    assert data["total"] == MACS / macs_per_cycle and data["input_shapes"] == {"x": [1, SEQ, HIDDEN]}
    assert data["shapes_from"] == "given" and data["seconds"] is None
    assert report.to_json().startswith("{")


def test_estimate_of_the_float_model_prices_fp32_macs(tiny):
    report = get_target("x86-vnni").cost_model.estimate(tiny[0], input_shapes={"x": [2, SEQ, HIDDEN]})
    assert report.counts["op_mac_float32_float32"] == 2 * MACS
    assert report.total == 2 * MACS / 16                               # AVX-512 FMA: 16 fp32 MACs a cycle


def test_estimate_asks_for_symbolic_input_shapes(compiled_tiny, tiny):
    # a compiled model records the shapes of its first calibration sample (edgeq.input_shapes)
    assert get_target("x86-vnni").cost_model.estimate(compiled_tiny["x86-vnni"]).shapes_from == \
        "recorded at compile time"
    with pytest.raises(CostModelError, match=r"input x has symbolic dims \['batch', 4, 16\].*"
                                             r"pass --input-shape x=D0,D1,\.\.\."):
        get_target("x86-vnni").cost_model.estimate(tiny[0])  # the float model records none


def test_estimate_takes_no_device_options(compiled_tiny):
    with pytest.raises(OptionError, match="takes no device option"):
        get_target("x86-vnni").cost_model.estimate(compiled_tiny["x86-vnni"], input_shapes={"x": [1, SEQ, HIDDEN]},
                                                   device="zcu102")
