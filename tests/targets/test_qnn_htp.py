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
    for op in graph.ops_of_type("LayerNormalization"):
        assert {_stored_dtype(graph, _weight_dq(graph, op, s)) for s in (1, 2)} == {U16}
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


def test_the_mixed_plan_narrows_tensors_only_within_the_allowance(bert_fixture, bert_samples):
    """A generous budget narrows some tensors to uint8 (end to end: producer Q and every reader),
    none at all with a budget below the 16-bit error."""
    def compile_with(budget):
        options = CompileOptions(verify=False, accuracy_budget=budget, input_shapes=(("input_ids", (1, 16)),))
        return edgeq.compile(bert_fixture, "qnn-htp", options, calibration=bert_samples)

    def activation_dtypes(graph):
        return {graph.constant(graph.inputs_of(op)[2]).elem_type for op in graph.ops()
                if op.op_type == "QuantizeLinear"}

    generous = compile_with(0.05)
    row = next(r for r in generous.report.passes if r.name == "mixed-precision")
    assert row.stats["narrowed_groups"] > 0 and row.stats["error"] <= 0.05
    assert activation_dtypes(generous.graph) == {TensorProto.UINT8, U16}
    assert validate(generous.graph, generous.target, raise_on_error=False) == []
    tight = compile_with(1e-6)
    assert next(r for r in tight.report.passes if r.name == "mixed-precision").stats["narrowed_groups"] == 0
    assert activation_dtypes(tight.graph) == {U16}


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
    # LayerNorm constants keep their own spec under int4 weights
    assert Scheme.resolve(TARGET, CompileOptions(weights="int4")).rules["LayerNormalization"].activations[1].dtype \
        == "uint16"
