"""The ARM64 targets as data: what each MLAS kernel family takes (arm-neon's 7-bit-plus-sign
weights against its 16-bit pair sums, symmetric int4 in KleidiAI's blocks of 32), the scheme
they give, validate rejecting a -128 weight on arm-neon only, and the per-core cost models
pricing a compiled model from the instruction rates. Running the output on a real aarch64
ONNX Runtime is tests/e2e/test_arm_emulation.py."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeq
from edgeq.compiler import compile
from edgeq.errors import ValidationError
from edgeq.options import CompileOptions
from edgeq.quant.plan import Scheme
from edgeq.registry import get_target
from edgeq.targets.arm import CORE_RATES, KLEIDIAI_BLOCK, cost_model
from edgeq.targets.base import Granularity, QSpec, validate
from edgeq.targets.x86 import MATMULNBITS_BLOCKS

ARM = ("arm-neon", "arm-dotprod", "arm-i8mm")
REFERENCE_CORE = {"arm-neon": "cortex-a53", "arm-dotprod": "cortex-a76", "arm-i8mm": "neoverse-n2"}


@pytest.mark.parametrize("name", ARM)
def test_arm_specs(name):
    target = get_target(name)
    assert target.activation == QSpec("uint8", symmetric=False)          # U8S8: full rate on every family
    weight = target.weight
    assert (weight.dtype, weight.symmetric, weight.granularity) == ("int8", True, Granularity.CHANNEL)
    int4 = target.weight_spec("int4")
    assert (int4.dtype, int4.symmetric, int4.granularity, int4.axis, int4.block_size) == \
        ("int4", True, Granularity.BLOCK, 0, KLEIDIAI_BLOCK) and KLEIDIAI_BLOCK == 32
    assert int4.accepted_block_sizes == weight.accepted_block_sizes == MATMULNBITS_BLOCKS
    assert target.weight_dtypes == {"int8", "int4"}
    assert {"uint8", "int8"} <= target.activation_dtypes                  # ORT keeps int8 activations on ARM
    for kind in ("MatMul", "Gemm", "Conv"):
        assert target.rule(kind).weight == weight
    assert target.rule("MatMul").activations == (target.activation, target.activation)   # U8U8 attention
    assert target.execution.provider == "CPUExecutionProvider"
    assert target.default_pipeline == get_target("x86-vnni").default_pipeline          # the same ORT provider
    assert target.rotate_weights == {"int4"} and target.signed_weight_scales
    assert CORE_RATES[REFERENCE_CORE[name]]["family"] == name
    assert REFERENCE_CORE[name] in target.cost_model.unit


def test_only_arm_neon_narrows_its_int8_weights():
    neon = get_target("arm-neon").weight
    assert (neon.qmin, neon.qmax, neon.bits) == (-127, 127, 8)
    for name in ("arm-dotprod", "arm-i8mm"):
        assert (get_target(name).weight.qmin, get_target(name).weight.qmax) == (-128, 127)


def test_fp16_is_a_note_where_the_cores_have_it():
    for name in ("arm-dotprod", "arm-i8mm"):
        (note,) = [n for n in get_target(name).notes if n.startswith("FP16")]
        assert "edgeq still emits them in float32" in note
        assert get_target(name).execution.high_precision == "float32"
    assert not any(n.startswith("FP16") for n in get_target("arm-neon").notes)
    assert CORE_RATES["cortex-a53"]["fp16"] is None


def test_scheme_takes_the_kleidiai_block_for_int4():
    scheme = Scheme.resolve(get_target("arm-i8mm"), CompileOptions(weights="int4", activations="float"))
    assert scheme.label == "W4 weight-only g32"
    assert scheme.head_weight == get_target("arm-i8mm").weight              # the LM head stays int8
    grouped = Scheme.resolve(get_target("arm-neon"), CompileOptions(group=64, activations="float"))
    weight = grouped.rules["MatMul"].weight
    assert (weight.block_size, weight.qrange) == (64, (-127, 127)) and grouped.label == "W8 weight-only g64"


# ---- a tiny model, compiled, validated and estimated ---------------------------------------

SEQ, HIDDEN, INNER, OUT = 4, 16, 8, 4
MACS = SEQ * HIDDEN * INNER + SEQ * INNER * OUT          # 640


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """x[batch, 4, 16] -> MatMul -> Relu -> MatMul -> y, with a weight column whose largest
    magnitude is negative (the one a full-range symmetric quantizer maps to -128)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((HIDDEN, INNER)).astype(np.float32)
    w1[3, 0] = -4 * np.abs(w1).max()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SEQ, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SEQ, OUT])],
        [numpy_helper.from_array(w1, "w1"),
         numpy_helper.from_array(rng.standard_normal((INNER, OUT)).astype(np.float32), "w2")])
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    samples = [{"x": rng.standard_normal((1, SEQ, HIDDEN)).astype(np.float32)} for _ in range(8)]
    return path, samples


@pytest.fixture(scope="module")
def compiled_tiny(tiny, tmp_path_factory):
    path, samples = tiny
    out = {}
    for name in ARM:
        out[name] = tmp_path_factory.mktemp(name) / "tiny.onnx"
        compile(path, name, CompileOptions(verify=False), calibration=samples).save(out[name])
    return out


def _weight_values(path) -> tuple:
    graph = edgeq.load(path)
    dq = next(dq for dq in graph.ops_of_type("DequantizeLinear") if graph.is_const(graph.inputs_of(dq)[0]))
    weights = graph.inputs_of(dq)[0]
    return graph, weights, graph.constant(weights).numpy().copy()


def test_arm_neon_weights_stay_in_127_and_validate_rejects_minus_128(compiled_tiny):
    graph, weights, values = _weight_values(compiled_tiny["arm-neon"])
    target = get_target("arm-neon")
    assert validate(graph, target) == []
    assert values.min() >= -127 and values.max() <= 127 and np.abs(values).max() == 127
    values[np.unravel_index(np.argmin(values), values.shape)] = -128            # what arm-dotprod may store
    graph.set_const(weights, values)
    with pytest.raises(ValidationError, match=r"1 violation\(s\) of target arm-neon; first: .*stored values "
                                              r"-128\.\.-?\d+ are outside the target's range -127\.\.127"):
        validate(graph, target)
    assert validate(graph, get_target("arm-dotprod")) == []


@pytest.mark.parametrize("name", ARM)
def test_estimate_prices_the_macs_at_the_reference_core(compiled_tiny, name):
    rates = CORE_RATES[REFERENCE_CORE[name]]
    report = get_target(name).cost_model.estimate(compiled_tiny[name], input_shapes={"x": [1, SEQ, HIDDEN]})
    assert report.counts["op_mac_uint8_int8"] == MACS
    assert report.total == pytest.approx(MACS / rates["qgemm_u8s8"])
    assert report.clock_hz is None and report.seconds is None          # no clock declared, none invented


def test_core_rates_follow_the_instruction_mix():
    a53, a76, n2 = (CORE_RATES[c] for c in ("cortex-a53", "cortex-a76", "neoverse-n2"))
    # SMULL + SMLAL (8 MACs each) + SADALP, three Q-form ops of 2 cycles on the 64-bit datapath
    assert a53["qgemm_u8s8"] == pytest.approx(16 / 6) and a53["fp32"] == 2
    assert a53["nbits"] == a53["fp32"]                    # no CompInt8 without the dot product
    # SDOT: 16 MACs, SMMLA: 32 MACs, FMLA .4s: 4 MACs; two 128-bit pipes on A76 and N2
    assert a76["qgemm_u8s8"] == 2 * 16 and n2["qgemm_u8s8"] == 2 * 32 and a76["fp32"] == n2["fp32"] == 8
    assert n2["qgemm_u8s8"] == 2 * a76["qgemm_u8s8"] and a76["qgemm_u8s8"] == 4 * a76["fp32"]
    for rates in (a53, a76, n2):
        assert "AArch64Sched" in rates["source"]


@pytest.mark.parametrize("core", sorted(CORE_RATES))
def test_every_pair_priced_on_x86_is_priced_on_each_core(core):
    model = cost_model(core)
    x86 = get_target("x86-vnni").cost_model
    assert set(x86.prices) <= set(model.prices)
    costs = model.cost({"op_mac_int8_int4": 64, "op_mac_float32_float32": 64})
    assert costs["op_mac_int8_int4"] == pytest.approx(64 / CORE_RATES[core]["nbits"])
    assert costs["op_mac_float32_float32"] == pytest.approx(64 / CORE_RATES[core]["fp32"])
