"""The qnn-htp target as data and what its compile writes, without the QNN provider: every op in
a QDQ node unit (validate names any op outside one, a wrong fixed output, an unshared data
movement), the specs of each tensor kind, fused RMSNorm, the mixed 8/16-bit plan. The runs on
the HTP simulator are in tests/runtime/test_qnn_htp.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeq
from edgeq.errors import ValidationError
from edgeq.ir import load
from edgeq.options import CompileOptions
from edgeq.pipeline import PassContext, PassManager
from edgeq.pipeline.artifacts import CALIBRATION_DATA
from edgeq.registry import get_pass, get_target
from edgeq.runtime.providers import ProviderError, for_device
from edgeq.targets.base import validate

from tests.passes.helpers import run

TARGET = get_target("qnn-htp")
U16 = TensorProto.UINT16


def _c(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _unit_graph(op: str, out_scale: float, out_zero: int, *, extra_nodes=(), out_shape=(1, 8, 16), attrs=None):
    """x -> Q -> DQ -> op -> Q(out_scale, out_zero) -> DQ -> y, uint16 throughout."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="x_q"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="x_dq"),
             *extra_nodes,
             helper.make_node(op, ["xd", *(["shape"] if op == "Reshape" else [])], ["t"], name="the_op", **(attrs or {})),
             helper.make_node("QuantizeLinear", ["t", "ts", "tz"], ["tq"], name="t_q"),
             helper.make_node("DequantizeLinear", ["tq", "ts", "tz"], ["y"], name="t_dq")]
    inits = [_c("xs", np.float32(8 / 65535)), _c("xz", np.uint16(32768)), _c("ts", np.float32(out_scale)),
             _c("tz", np.uint16(out_zero)), _c("shape", np.array([1, 128], np.int64))]
    graph = helper.make_graph(nodes, "unit", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))], inits)
    return load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))


def test_a_sigmoid_output_must_carry_the_fixed_quantization_the_htp_imposes():
    assert validate(_unit_graph("Sigmoid", 1 / 65536, 0), TARGET, raise_on_error=False) == []
    violations = validate(_unit_graph("Sigmoid", 1 / 60000, 0), TARGET, raise_on_error=False)
    assert [v.node for v in violations] == ["the_op"]
    assert "fixed (1.52588e-05, 0)" in violations[0].problem


def test_data_movement_must_keep_its_input_quantization():
    assert validate(_unit_graph("Reshape", 8 / 65535, 32768, out_shape=(1, 128)), TARGET, raise_on_error=False) == []
    violations = validate(_unit_graph("Reshape", 9 / 65535, 32768, out_shape=(1, 128)), TARGET, raise_on_error=False)
    assert len(violations) == 1 and violations[0].node == "the_op" and "like its input" in violations[0].problem


def test_an_op_outside_a_node_unit_is_named():
    # An op the target has no rule for (Erf: the HTP does not take it quantized).
    violations = validate(_unit_graph("Erf", 2 / 65535, 32768), TARGET, raise_on_error=False)
    assert [v.node for v in violations] == ["the_op"] and "no quantized Erf" in violations[0].problem
    # A float op between two node units: its input is no DQ output and its output reaches no Q.
    relu = helper.make_node("Relu", ["xd"], ["r"], name="float_relu")
    graph = _unit_graph("Sigmoid", 1 / 65536, 0, extra_nodes=[relu])
    graph.set_input(graph.consumers(graph.value("xd"))[-1], 0, graph.value("r"))  # Sigmoid reads the Relu
    with pytest.raises(ValidationError, match="float_relu: Relu output r is float"):
        validate(graph, TARGET)


def test_devices_set_the_provider_options_and_unknown_ones_are_a_one_line_error():
    execution = TARGET.executions[0]
    default = for_device(execution, None)
    assert default.device == "v73" and dict(default.provider_options)["htp_arch"] == "73"
    soc = dict(for_device(execution, "sm8650").provider_options)
    assert (soc["htp_arch"], soc["soc_model"], soc["backend_type"]) == ("75", "57", "htp")
    with pytest.raises(ProviderError, match="use --device with one of v73, v68"):
        for_device(execution, "v99")


@pytest.fixture(scope="module")
def bert_fixture(shared_dir):
    return shared_dir / "fixtures/exports/bert_tiny_torchscript.onnx"


@pytest.fixture(scope="module")
def bert_samples(shared_dir):
    """Eight 1 x 16 samples: the fixture's own input rows, cut and re-drawn."""
    io = np.load(shared_dir / "fixtures/exports/bert_tiny_io.npz")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(8):
        ids = rng.integers(0, 1000, (1, 16)).astype(np.int64)
        mask = np.ones((1, 16), np.int64)
        mask[0, 12 + i % 4:] = 0 if i % 2 else 1
        samples.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros((1, 16), np.int64)})
    assert set(samples[0]) <= set(io.files)
    return samples


@pytest.fixture(scope="module")
def compiled_bert(bert_fixture, bert_samples):
    """The BERT fixture (TorchScript export) compiled for qnn-htp without running it on the HTP."""
    options = CompileOptions(verify=False, input_shapes=(("input_ids", (1, 16)),))
    return edgeq.compile(bert_fixture, "qnn-htp", options, calibration=bert_samples)


def _stored_dtype(graph, dq) -> int:
    return graph.constant(graph.inputs_of(dq)[2]).elem_type


def _weight_dq(graph, op, slot):
    producer = graph.producer(graph.inputs_of(op)[slot])
    assert producer.op_type == "DequantizeLinear" and graph.is_const(graph.inputs_of(producer)[0])
    return producer


def test_every_tensor_of_the_bert_fixture_is_quantized_as_the_htp_takes_it(compiled_bert, bert_fixture, bert_samples):
    graph = compiled_bert.graph
    assert validate(graph, compiled_bert.target, raise_on_error=False) == []  # every op in a node unit
    kinds = {op.op_type for op in graph.ops()} - {"QuantizeLinear", "DequantizeLinear"}
    assert {"LayerNormalization", "Softmax", "Gelu", "MatMul", "Gather", "Reshape", "Transpose"} <= kinds
    # linear weights int8 per output channel; LayerNorm gamma and beta, embedding tables: uint16 constants
    linears = [op for op in graph.ops_of_type("MatMul") if graph.is_const(
        graph.inputs_of(graph.producer(graph.inputs_of(op)[1]))[0])]
    assert len(linears) == 12
    for op in linears:
        dq = _weight_dq(graph, op, 1)
        assert _stored_dtype(graph, dq) == TensorProto.INT8 and graph.constant(graph.inputs_of(dq)[1]).numpy().ndim == 1
    # LayerNorm: unit gamma at 8 bits (exact: 255 x 1/255), no beta (split-norm-affine moved them to Mul/Add)
    for op in graph.ops_of_type("LayerNormalization"):
        assert len(graph.inputs_of(op)) == 2
        dq = _weight_dq(graph, op, 1)
        stored, scale = (graph.constant(graph.inputs_of(dq)[k]).numpy() for k in (0, 1))
        assert stored.dtype == np.uint8 and np.all(stored.astype(np.float32) * scale == 1.0)
    assert {_stored_dtype(graph, _weight_dq(graph, op, 0)) for op in graph.ops_of_type("Gather")} == {U16}
    # softmax probabilities leave with the fixed (1/65536, 0), or (1/256, 0) where the mixed plan made them 8-bit
    for softmax in graph.ops_of_type("Softmax"):
        q = graph.consumers(graph.outputs_of(softmax)[0])[0]
        scale, zero = (graph.constant(v).numpy() for v in graph.inputs_of(q)[1:3])
        fixed = 1 / 65536 if zero.dtype == np.uint16 else 1 / 256
        assert q.op_type == "QuantizeLinear" and float(scale) == np.float32(fixed) and int(zero) == 0
    # the graph output leaves through Q -> DQ under its own name; the QDQ model's CPU run is close to float
    out = graph.outputs[0]
    assert out.name == "last_hidden_state" and graph.producer(out).op_type == "DequantizeLinear"
    feed = bert_samples[0]
    expected = run(str(bert_fixture), feed)[0]
    got = run(edgeq.ir.to_model_proto(graph), feed)[0]
    cos = np.sum(expected * got, -1) / np.linalg.norm(expected, axis=-1) / np.linalg.norm(got, axis=-1)
    assert cos.mean() > 0.999


def test_rms_norms_are_fused_into_one_op_at_opset_23(shared_dir):
    path = shared_dir / "fixtures/exports/llama_tiny_torchscript.onnx"
    graph = load(path)
    ctx = PassContext(target=TARGET)
    pre = [get_pass(n)() if n != "convert-opset" else get_pass(n)(21) for n in TARGET.default_pipeline[:7]]
    PassManager(pre + [get_pass("fuse-rms-norm")()])(graph, ctx)
    kinds = [op.op_type for op in graph.ops()]
    assert kinds.count("RMSNormalization") == 5 and "Reciprocal" not in kinds and "Pow" not in kinds
    assert graph.model.opset_imports[""] == 23
    io = np.load(shared_dir / "fixtures/exports/llama_tiny_io.npz")
    feed = {"input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}
    fused = run(edgeq.ir.to_model_proto(graph), feed)[0]
    np.testing.assert_allclose(fused, run(str(path), feed)[0], atol=2e-5)


def _node_unit_dtypes(graph) -> list[str]:
    """Ops whose QDQ node unit mixes widths (ONNX Runtime groups DQ -> op -> Q only when the
    op's inputs, input 0 for linear ops and norms, and output share a dtype)."""
    bad = []
    for op in graph.ops():
        if op.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        ins = graph.inputs_of(op)
        if op.op_type in ("MatMul", "Gemm", "Conv", "LayerNormalization", "RMSNormalization"):
            ins = ins[:1]
        dtypes = set()
        for value in [*ins, *graph.outputs_of(op)]:
            if value is None:
                continue
            dq = graph.producer(value) if value in ins else None
            readers = graph.consumers(value) if value not in ins else []
            for quant in [dq, *readers]:
                if quant is not None and quant.op_type in ("QuantizeLinear", "DequantizeLinear"):
                    dtypes.add(graph.constant(graph.inputs_of(quant)[2]).elem_type)
        if len(dtypes) > 1:
            bad.append(op.name)
    return bad


def test_the_mixed_plan_keeps_one_width_per_node_unit(bert_fixture, bert_samples):
    """Tensors tied by a node unit narrow together; on BERT each such group reaches the residual
    stream, which stays 16-bit, so even a generous budget narrows nothing (a MatMul reading 16
    bits and writing 8 ran in float on the HTP, issue 13); --activations int8 narrows all."""
    def compile_with(budget):
        options = CompileOptions(verify=False, accuracy_budget=budget, input_shapes=(("input_ids", (1, 16)),))
        return edgeq.compile(bert_fixture, "qnn-htp", options, calibration=bert_samples)

    generous = compile_with(0.05)
    row = next(r for r in generous.report.passes if r.name == "mixed-precision")
    assert row.stats["narrowed_groups"] == 0 and row.stats["candidates"] == 0 and row.stats["groups"] >= 1
    assert _node_unit_dtypes(generous.graph) == []
    assert validate(generous.graph, generous.target, raise_on_error=False) == []


def test_split_norm_affine_keeps_the_norm_exact_in_float():
    """LayerNorm(x, gamma, beta) -> Add(Mul(LayerNorm(x, 1), gamma), beta), same values."""
    rng = np.random.default_rng(0)
    gamma, beta = (1 + 0.3 * rng.standard_normal(16)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], name="ln", axis=-1, epsilon=1e-5)
    graph = helper.make_graph([node], "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16])],
                              [_c("g", gamma), _c("b", beta)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    ir = load(model)
    result = get_pass("split-norm-affine")().run(ir, PassContext(target=TARGET))
    assert result.stats == {"norms_split": 1}
    assert [op.op_type for op in ir.topo_order()] == ["LayerNormalization", "Mul", "Add"]
    x = rng.standard_normal((1, 8, 16)).astype(np.float32)
    np.testing.assert_allclose(run(edgeq.ir.to_model_proto(ir), {"x": x})[0], run(model, {"x": x})[0], atol=1e-5)


def test_activations_int8_narrows_every_tensor_and_the_fixed_outputs_follow(bert_fixture, bert_samples):
    options = CompileOptions(verify=False, activations="int8", input_shapes=(("input_ids", (1, 16)),))
    compiled = edgeq.compile(bert_fixture, "qnn-htp", options, calibration=bert_samples)
    graph = compiled.graph
    assert compiled.report.scheme == "W8A8"
    assert {graph.constant(graph.inputs_of(op)[2]).elem_type for op in graph.ops()
            if op.op_type == "QuantizeLinear"} == {TensorProto.UINT8}
    softmax_q = graph.consumers(graph.outputs_of(graph.ops_of_type("Softmax")[0])[0])[0]
    assert float(graph.constant(graph.inputs_of(softmax_q)[1]).numpy()) == np.float32(1 / 256)
    assert validate(graph, compiled.target, raise_on_error=False) == []


def test_the_default_scheme_is_w8a16_with_int4_on_request():
    assert dataclasses.replace(TARGET).activation.dtype == "uint16"
    from edgeq.quant.plan import Scheme

    assert Scheme.resolve(TARGET, CompileOptions()).label == "W8A16"
    assert Scheme.resolve(TARGET, CompileOptions(weights="int4")).label == "W4A16"
    # LayerNorm's unit gamma keeps its own 8-bit spec under int4 weights and 16-bit activations
    assert Scheme.resolve(TARGET, CompileOptions(weights="int4")).rules["LayerNormalization"].activations[1].dtype \
        == "uint8"


@pytest.mark.parametrize("producer", ["Conv", "ConvTranspose", "Relu"])
def test_batch_norms_fold_into_the_conv_before_them_else_a_mul_and_add(producer):
    """PP-OCRv4 det keeps three BatchNormalizations (after a Conv and two ConvTransposes), which
    the HTP does not take quantized: fold-batch-norm removes them with the same values."""
    rng = np.random.default_rng(0)
    channels = 6
    stats = [_c(n, v.astype(np.float32)) for n, v in (("s", 1 + 0.3 * rng.standard_normal(channels)),
                                                       ("b", rng.standard_normal(channels)),
                                                       ("m", rng.standard_normal(channels)),
                                                       ("v", 0.5 + rng.random(channels)))]
    if producer == "Conv":
        first = helper.make_node("Conv", ["x", "w"], ["t"], name="conv", pads=[1, 1, 1, 1])
        weight = _c("w", rng.standard_normal((channels, 4, 3, 3)).astype(np.float32))
    elif producer == "ConvTranspose":
        first = helper.make_node("ConvTranspose", ["x", "w", "cb"], ["t"], name="deconv", strides=[2, 2], group=2)
        weight = _c("w", rng.standard_normal((4, channels // 2, 2, 2)).astype(np.float32))
        stats.append(_c("cb", rng.standard_normal(channels).astype(np.float32)))
    else:
        first = helper.make_node("Relu", ["x"], ["t"], name="relu")
        weight = _c("w", np.zeros(1, np.float32))
    in_channels = 4 if producer != "Relu" else channels
    bn = helper.make_node("BatchNormalization", ["t", "s", "b", "m", "v"], ["y"], name="bn", epsilon=1e-3)
    graph = helper.make_graph([first, bn], "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                  [1, in_channels, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight, *stats])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    ir = load(model)
    get_pass("shape-inference")().run(ir, PassContext(target=TARGET))
    result = get_pass("fold-batch-norm")().run(ir, PassContext(target=TARGET))
    kinds = [op.op_type for op in ir.topo_order()]
    assert "BatchNormalization" not in kinds
    folded = {"into_conv": 0, "as_mul_add": 1} if producer == "Relu" else {"into_conv": 1, "as_mul_add": 0}
    assert result.stats == folded
    assert kinds == ([producer] if producer != "Relu" else ["Relu", "Mul", "Add"])
    assert [v.name for v in ir.outputs] == ["y"]
    x = rng.standard_normal((1, in_channels, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(run(edgeq.ir.to_model_proto(ir), {"x": x})[0], run(model, {"x": x})[0], atol=2e-5)
