"""Work counts (edgeq.cost.count_work) and every target's cost model: the dtype-pair rule, MACs of
each op kind counted by hand, where shapes come from, and unpriced work raising."""

from __future__ import annotations

import inspect
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeq.targets.fpga as fpga_module
from edgeq.backends.fpga.cost import FpgaCostModel
from edgeq.cost import count_work
from edgeq.metadata import INPUT_SHAPES_KEY
from edgeq.errors import CostModelError, OptionError
from edgeq.registry import get_target, targets
from edgeq.targets.base import CostModel

F = TensorProto.FLOAT
M, K, N = 3, 64, 32
RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, initializers, *, opset=21, metadata=None, domains=()) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", opset)]
                              + [helper.make_opsetid(d, 1) for d in domains])
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def _weight_dq(dtype: int, values: np.ndarray, **attrs) -> tuple[list, list]:
    """DQ(w) -> wd, per channel of axis 1 unless attrs say otherwise."""
    blocked = "block_size" in attrs
    scale_shape = (values.shape[0] // attrs["block_size"], values.shape[1]) if blocked else (values.shape[1],)
    init = [helper.make_tensor("w", dtype, values.shape, values.flatten().tolist()),
            numpy_helper.from_array(np.full(scale_shape, 0.01, np.float32), "ws")]
    return [helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], **(attrs or {"axis": 1}))], init


def _linear(activation: str, weight_dtype: int, **dq_attrs) -> onnx.ModelProto:
    """x[M, K] (float, or uint8 through Q/DQ) x DQ(w[K, N])."""
    values = RNG.integers(-8, 8, size=(K, N)).astype(np.int8)
    nodes, init = _weight_dq(weight_dtype, values, **dq_attrs)
    a = "x"
    if activation == "uint8":
        init += [numpy_helper.from_array(np.array(0.1, np.float32), "xs"),
                 numpy_helper.from_array(np.array(128, np.uint8), "xz")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"])]
        a = "xd"
    nodes.append(helper.make_node("MatMul", [a, "wd"], ["y"]))
    return _model(nodes, [helper.make_tensor_value_info("x", F, [M, K])],
                  [helper.make_tensor_value_info("y", F, [M, N])], init)


# ---- the dtype pairs -------------------------------------------------------------------------


def test_weight_only_int4_counts_as_ort_computes_it():
    """MatMulNBits (ORT's fusion of DQ -> MatMul) quantizes the float activation to int8."""
    counts = count_work(_linear("float", TensorProto.INT4, axis=0, block_size=32)).counts
    assert counts == {"op_mac_int8_int4": M * K * N, "weight_bytes_int4": K * N // 2,
                      "activation_bytes_float32": M * K * 4}


def test_weight_only_int8_per_channel_counts_as_int8_too():
    assert count_work(_linear("float", TensorProto.INT8)).counts["op_mac_int8_int8"] == M * K * N


def test_quantized_activations_count_as_stored():
    counts = count_work(_linear("uint8", TensorProto.INT4, axis=0, block_size=32)).counts  # W4A8
    assert counts == {"op_mac_uint8_int4": M * K * N, "weight_bytes_int4": K * N // 2,
                      "activation_bytes_uint8": M * K}
    assert count_work(_linear("uint8", TensorProto.INT8)).counts["op_mac_uint8_int8"] == M * K * N


def test_float_matmul_of_two_activations():
    model = _model([helper.make_node("MatMul", ["a", "b"], ["y"])],
                   [helper.make_tensor_value_info("a", F, [2, M, K]), helper.make_tensor_value_info("b", F, [2, K, N])],
                   [helper.make_tensor_value_info("y", F, [2, M, N])], [])
    assert count_work(model).counts == {"op_mac_float32_float32": 2 * M * K * N,
                                        "activation_bytes_float32": 2 * (M * K + K * N) * 4}


# ---- MACs of each op kind ---------------------------------------------------------------------


def test_gemm_with_transposes_and_a_dequantized_weight():
    values = RNG.integers(-127, 128, size=(N, K)).astype(np.int8)          # transB: [N, K]
    init = [numpy_helper.from_array(values, "w"), numpy_helper.from_array(np.full((N,), 0.01, np.float32), "ws")]
    nodes = [helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=0),
             helper.make_node("Gemm", ["x", "wd"], ["y"], transA=1, transB=1)]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [K, M])],
                   [helper.make_tensor_value_info("y", F, [M, N])], init)
    # a transposed Gemm is not fused into MatMulNBits: the stored pair, float x int8
    assert count_work(model).counts["op_mac_float32_int8"] == M * K * N


def test_conv_macs():
    init = [numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")]
    model = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [helper.make_tensor_value_info("x", F, [1, 3, 8, 8])],
                   [helper.make_tensor_value_info("y", F, [1, 4, 6, 6])], init)
    counts = count_work(model).counts
    assert counts["op_mac_float32_float32"] == (4 * 6 * 6) * (3 * 3 * 3)  # output elements x window
    assert counts["weight_bytes_float32"] == 4 * 3 * 3 * 3 * 4


@pytest.mark.parametrize("level,activation", [(4, "int8"), (0, "float32")])
def test_explicit_matmulnbits(level, activation):
    blob = numpy_helper.from_array(np.zeros((N, K // 32, 16), np.uint8), "b")
    init = [blob, numpy_helper.from_array(np.ones((N * K // 32,), np.float32), "s")]
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=K, N=N, bits=4,
                            block_size=32, accuracy_level=level)
    model = _model([node], [helper.make_tensor_value_info("x", F, [M, K])],
                   [helper.make_tensor_value_info("y", F, [M, N])], init, domains=("com.microsoft",))
    counts = count_work(model).counts
    assert counts[f"op_mac_{activation}_uint4"] == M * K * N
    assert counts["weight_bytes_uint4"] == N * K // 2                     # the packed blob


def test_an_op_whose_macs_are_not_counted_raises():
    model = _model([helper.make_node("ConvTranspose", ["a", "b"], ["y"])],
                   [helper.make_tensor_value_info("a", F, [1, M, 4, 4]),
                    helper.make_tensor_value_info("b", F, [M, N, 3, 3])],
                   [helper.make_tensor_value_info("y", F, [1, N, 6, 6])], [])
    with pytest.raises(CostModelError, match="cannot count the MACs of ConvTranspose"):
        count_work(model)


def test_einsum_counts_one_mac_per_combination_of_its_letters():
    """An online Hadamard factor x[..., f] . H[f, g] (edgeq's rotation writes Einsums like it):
    every output element sums f products; the constant factor counts as a weight."""
    factor = numpy_helper.from_array(RNG.standard_normal((K, K)).astype(np.float32), "h")
    model = _model([helper.make_node("Einsum", ["x", "h"], ["y"], equation="...f,fg->...g")],
                   [helper.make_tensor_value_info("x", F, [2, M, K])],
                   [helper.make_tensor_value_info("y", F, [2, M, K])], [factor])
    counts = count_work(model).counts
    assert counts["op_mac_float32_float32"] == 2 * M * K * K
    assert counts["weight_bytes_float32"] == K * K * 4
    matmul = _model([helper.make_node("Einsum", ["a", "b"], ["y"], equation="bij,bjk->bik")],
                    [helper.make_tensor_value_info("a", F, [3, M, K]), helper.make_tensor_value_info("b", F, [3, K, N])],
                    [helper.make_tensor_value_info("y", F, [3, M, N])], [])
    assert count_work(matmul).counts["op_mac_float32_float32"] == 3 * M * K * N


# ---- shapes ----------------------------------------------------------------------------------


def _symbolic(metadata=None) -> onnx.ModelProto:
    """x[batch, seq, K] -> Reshape to [-1, K] (shape arithmetic) -> MatMul w[K, N]."""
    init = [numpy_helper.from_array(RNG.standard_normal((K, N)).astype(np.float32), "w"),
            numpy_helper.from_array(np.array([-1, K], np.int64), "flat")]
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["x2"]), helper.make_node("MatMul", ["x2", "w"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["batch", "seq", K])],
                  [helper.make_tensor_value_info("y", F, None)], init, metadata=metadata)


def test_symbolic_inputs_take_the_given_shapes():
    work = count_work(_symbolic(), input_shapes={"x": [2, 5, K]})
    assert work.counts["op_mac_float32_float32"] == 10 * K * N
    assert work.input_shapes == {"x": (2, 5, K)} and work.shapes_from == "given"


def test_symbolic_inputs_take_the_recorded_shapes():
    work = count_work(_symbolic({INPUT_SHAPES_KEY: json.dumps({"x": [1, 7, K]})}))
    assert work.counts["op_mac_float32_float32"] == 7 * K * N
    assert work.shapes_from == "recorded at compile time"
    # given shapes win over recorded ones
    assert count_work(_symbolic({INPUT_SHAPES_KEY: json.dumps({"x": [1, 7, K]})}),
                      input_shapes={"x": [1, 3, K]}).macs == 3 * K * N


def test_symbolic_inputs_without_shapes_ask_for_input_shape():
    with pytest.raises(CostModelError) as info:
        count_work(_symbolic())
    assert str(info.value) == ("input x has symbolic dims ['batch', 'seq', 64] and the model records no shape for "
                               "it (pass --input-shape x=D0,D1,...)")


@pytest.mark.parametrize("shapes,message", [({"y": [1]}, "names no input of the model: y"),
                                            ({"x": [2, 5]}, "does not fit the input's dims"),
                                            ({"x": [2, 5, 3]}, "does not fit the input's dims")])
def test_bad_input_shapes(shapes, message):
    with pytest.raises(CostModelError, match=message):
        count_work(_symbolic(), input_shapes=shapes)


# ---- cost models ------------------------------------------------------------------------------


def test_unpriced_work_raises_instead_of_costing_zero():
    model = _model([helper.make_node("MatMul", ["a", "b"], ["y"])],
                   [helper.make_tensor_value_info("a", TensorProto.FLOAT16, [M, K]),
                    helper.make_tensor_value_info("b", TensorProto.FLOAT16, [K, N])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [M, N])], [])
    with pytest.raises(CostModelError, match="no price for op_mac_float16_float16"):
        get_target("x86-vnni").cost_model.estimate(model)


def test_a_declared_clock_gives_time():
    model = CostModel(unit="cycles", prices={"op_mac_float32_float32": 0.5}, clock_hz=2e9)
    report = model.estimate(_symbolic(), input_shapes={"x": [1, 4, K]})
    assert report.total == 4 * K * N * 0.5 and report.seconds == report.total / 2e9
    assert "ms at 2 GHz" in report.to_text()
    # bytes are reported but only op_mac counts are priced
    assert set(report.costs) == {"op_mac_float32_float32"} and "weight_bytes_float32" in report.counts


def test_every_target_with_a_cost_model_is_reachable(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_symbolic(), path)
    priced = {name: t.cost_model for name, t in targets().items() if t.cost_model is not None}
    assert {"x86-vnni", "x86-avx2", "x86-amx", "fpga"} <= set(priced)
    for name, model in priced.items():
        if model.needs_device:
            with pytest.raises(OptionError, match="add --device D"):
                model.estimate(path, input_shapes={"x": [1, 4, K]})
        else:
            assert model.estimate(path, input_shapes={"x": [1, 4, K]}).total > 0, name


def test_fpga_cost_model_lives_in_its_backend():
    model = get_target("fpga").cost_model
    assert type(model) is FpgaCostModel and model.needs_device
    with pytest.raises(CostModelError, match="prices a compiled model on a device"):
        model.cost({"op_mac_int8_int8": 1})
    # targets/fpga.py declares data only: no class or function of its own
    own = [name for name, value in vars(fpga_module).items()
           if (inspect.isclass(value) or inspect.isfunction(value)) and value.__module__ == fpga_module.__name__]
    assert own == []


def test_fpga_estimate_takes_the_device_as_a_keyword(tmp_path):
    """A QDQ linear priced on a device; the shapes given are stated in its assumptions."""
    path = tmp_path / "linear.onnx"
    onnx.save(_linear("uint8", TensorProto.INT8), path)
    report = get_target("fpga").cost_model.estimate(path, device="kv260", input_shapes={"x": [M, K]})
    assert report.device and report.latency_cycles > 0
    assert report.assumptions[0] == f"input shapes x={[M, K]}: given"
