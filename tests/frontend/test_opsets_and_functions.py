"""Opsets 13 to 16 and ONNX local functions reach the passes in the target's form: a fixture
written at opset 13..16 compiles for x86-vnni (convert-opset raises it to 21; LayerNormalization
only exists from 17, so the BERT below carries it decomposed), and a block wrapped in a local
function is inlined before the passes look at it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper, version_converter

import edgeq
from edgeq.frontend.functions import function_calls, inline_functions
from edgeq.frontend.inspect import summarize
from edgeq.frontend.patterns import Role, find_roles
from edgeq.ir import to_model_proto
from edgeq.passes.identity_elimination import IdentityElimination
from tests.frontend.test_fixture_compile import calibration_dir
from tests.frontend.test_fixture_shapes import fixture_inputs
from tests.passes.helpers import assert_valid, run

node = helper.make_node


def _decompose_layer_norm(model: onnx.ModelProto) -> onnx.ModelProto:
    """LayerNormalization(x, g, b) as the opset-13 exporters wrote it (ReduceMean ... Div, Mul, Add)."""
    nodes = []
    for n in model.graph.node:
        if n.op_type != "LayerNormalization":
            nodes.append(n)
            continue
        x, gamma, beta = n.input[:3]
        eps = next(a.f for a in n.attribute if a.name == "epsilon")
        p = f"{n.name}_ln/"
        model.graph.initializer.extend([numpy_helper.from_array(np.array(2.0, np.float32), p + "two"),
                                        numpy_helper.from_array(np.array(eps, np.float32), p + "eps")])
        nodes += [node("ReduceMean", [x], [p + "mean"], axes=[-1]), node("Sub", [x, p + "mean"], [p + "centred"]),
                  node("Pow", [p + "centred", p + "two"], [p + "sq"]),
                  node("ReduceMean", [p + "sq"], [p + "var"], axes=[-1]),
                  node("Add", [p + "var", p + "eps"], [p + "var_eps"]), node("Sqrt", [p + "var_eps"], [p + "std"]),
                  node("Div", [p + "centred", p + "std"], [p + "normed"]),
                  node("Mul", [p + "normed", gamma], [p + "scaled"]), node("Add", [p + "scaled", beta], [n.output[0]])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def at_opset(path, version: int) -> onnx.ModelProto:
    """The fixture written at `version`: onnx's converter down to 15 (it has no adapter below 15
    for Shape), then the opset number alone where no op used changed meaning (the checker's
    full check at that opset says so)."""
    graph = edgeq.load(path)
    IdentityElimination()(graph)  # Identity-16 has no down adapter either
    model = _decompose_layer_norm(to_model_proto(graph))
    model = version_converter.convert_version(model, max(version, 15))
    if version < 15:
        model.opset_import[0].version = version
        for n in model.graph.node:  # Reshape's allowzero (14) at its default means what Reshape-13 does
            kept = [a for a in n.attribute if not (n.op_type == "Reshape" and a.name == "allowzero" and a.i == 0)]
            if version < 14 and len(kept) != len(n.attribute):
                del n.attribute[:]
                n.attribute.extend(kept)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("name,version", [("bert_tiny_torchscript", 13), ("bert_tiny_torchscript", 14),
                                          ("bert_tiny_torchscript", 16), ("llama_tiny_torchscript", 15)])
def test_fixture_at_an_older_opset_compiles_for_x86_vnni(name, version, shared_dir, tmp_path):
    path = shared_dir / "fixtures" / "exports" / f"{name}.onnx"
    model = at_opset(path, version)
    assert model.opset_import[0].version == version
    assert "LayerNormalization" not in {n.op_type for n in model.graph.node}
    older = tmp_path / "older.onnx"
    onnx.save(model, str(older))
    feeds = fixture_inputs(shared_dir, name)
    np.testing.assert_allclose(run(model, feeds, optimize=False)[0], run(onnx.load(str(path)), feeds)[0], atol=1e-5)
    calib = calibration_dir(tmp_path / "calib", feeds, count=6)
    result = edgeq.compile(older, "x86-vnni", calibration=calib)
    stats = {p.name: p.stats for p in result.report.passes}
    assert stats["convert-opset"] == {"from": version, "to": 21}
    assert result.graph.model.opset_imports[""] == 21
    cosine = min(o.cosine_min for o in result.report.verification.outputs)
    assert cosine >= (0.9999 if "bert" in name else 0.95), cosine  # the random Llama's logits: 0.97-0.99
    assert result.report.quantized_ops.get("MatMul", 0) + result.report.quantized_ops.get("Gemm", 0) >= 12


def _function_wrapped_mlp() -> onnx.ModelProto:
    """y = MLP(x) with MLP a local function: MatMul, GELU (Erf form), MatMul; weights as inputs."""
    body = [node("MatMul", ["x", "w1"], ["h"]), node("Div", ["h", "sqrt2"], ["hd"]), node("Erf", ["hd"], ["e"]),
            node("Add", ["e", "one"], ["e1"]), node("Mul", ["h", "e1"], ["he"]), node("Mul", ["he", "half"], ["g"]),
            node("MatMul", ["g", "w2"], ["y"])]
    constants = [node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.float32), name))
                 for name, v in (("sqrt2", np.sqrt(2.0)), ("one", 1.0), ("half", 0.5))]
    mlp = helper.make_function("blocks", "Mlp", ["x", "w1", "w2"], ["y"], constants + body,
                               [helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [node("Mlp", ["x", "w1", "w2"], ["m"], domain="blocks"), node("Add", ["x", "m"], ["out"])], "wrapped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32) * 0.3, "w1"),
         numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32) * 0.3, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("blocks", 1)],
                              functions=[mlp])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_function_wrapped_block_is_inlined_before_the_passes(tmp_path):
    model = _function_wrapped_mlp()
    graph = edgeq.load(model)
    assert function_calls(graph) == 1 and not find_roles(graph).blocks.get(Role.GELU)
    w1 = graph.value("w1").const
    assert inline_functions(graph) == 1
    assert_valid(graph)
    assert graph.model.functions == [] and graph.value("w1").const is w1  # weights handed over, not copied
    roles = find_roles(graph)
    assert len(roles.blocks[Role.GELU]) == 1 and len(roles.blocks[Role.LINEAR]) == 2
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(run(graph, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-6)

    summary = summarize(edgeq.load(model))
    assert summary["functions"] == ["blocks::Mlp"] and summary["custom_ops"] == {"blocks::Mlp": 1}
    assert summary["recognised_blocks"]["GELU"] == 1 and summary["recognised_blocks"]["Linear"] == 2
    assert summary["custom_ops_after_front_end"] == {}

    path = tmp_path / "wrapped.onnx"
    onnx.save(model, str(path))
    samples = [{"x": np.random.default_rng(i).standard_normal((2, 16)).astype(np.float32)} for i in range(32)]
    result = edgeq.compile(path, "x86-vnni", calibration=samples)
    assert result.report.quantized_ops.get("MatMul", 0) + result.report.quantized_ops.get("Gemm", 0) == 2
    assert not any(op.domain == "blocks" for op in result.graph.ops())
    assert min(o.cosine_min for o in result.report.verification.outputs) >= 0.999
