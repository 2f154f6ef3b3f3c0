"""qnn-htp on the HTP itself: ONNX Runtime's QNN provider with the HTP backend (the simulator that
the onnxruntime-qnn wheel ships for x86-64 Linux), CPU fallback disabled.

Each shared fixture (the three BERT exports, both Llama exports) compiles for qnn-htp with the
compile's own verification and placement check on the HTP: every node on the provider, every
quantized op in a QDQ node unit (none computed in float there), the output close to float as the
HTP computes it; its EP-context model reloads with fallback disabled and gives the QDQ model's
outputs exactly. A node the HTP does not take fails with one line naming it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("onnxruntime_qnn")

import edgeq  # noqa: E402
from edgeq.options import CompileOptions  # noqa: E402
from edgeq.registry import get_target  # noqa: E402
from edgeq.runtime.ep_context import is_ep_context, write_ep_context  # noqa: E402
from edgeq.runtime.placement import check_placement  # noqa: E402
from edgeq.runtime.providers import ProviderError, for_device  # noqa: E402
from edgeq.runtime.sessions import make_session  # noqa: E402

TARGET = get_target("qnn-htp")
HTP = for_device(TARGET.executions[0], None)  # v73

# Cosine of the HTP's output with float per position, mean over 4 samples. Measured with
# onnxruntime-qnn 2.7 (QNN SDK 2.51) at v73: BERT exports 0.9999997, Llama exports 0.99946 (the
# compile is deterministic and so is the simulator); floors with margin.
FLOORS = {"bert": 0.9999, "llama": 0.999}
FIXTURES = ["bert_tiny_torchscript", "bert_tiny_dynamo", "bert_tiny_ort_fused", "llama_tiny_torchscript",
            "llama_tiny_dynamo"]


def _samples(family: str, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    length = 32 if family == "bert" else 48
    samples = []
    for i in range(count):
        feed = {"input_ids": rng.integers(0, 1000, (1, length)).astype(np.int64),
                "attention_mask": np.ones((1, length), np.int64)}
        if family == "bert":
            feed["attention_mask"][0, length - 4 - i % 4:] = 0 if i % 2 else 1
            feed["token_type_ids"] = np.zeros((1, length), np.int64)
        samples.append(feed)
    return samples


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)


@pytest.fixture(scope="module", params=FIXTURES)
def compiled(request, shared_dir, tmp_path_factory):
    """(family, float path, compiled path, report) of one fixture compiled with verification and
    the placement check on the HTP."""
    name = request.param
    family = name.split("_")[0]
    source = shared_dir / f"fixtures/exports/{name}.onnx"
    shape = (1, 32) if family == "bert" else (1, 48)
    options = CompileOptions(input_shapes=(("input_ids", shape),))
    result = edgeq.compile(source, "qnn-htp", options, calibration=_samples(family, 8, seed=0))
    path = result.save(tmp_path_factory.mktemp("qnn") / f"{name}.onnx")
    return family, source, path, result


def test_every_node_runs_on_the_htp_in_a_node_unit(compiled):
    family, _, _, result = compiled
    report = result.report
    assert result.target.execution.provider == "QNNExecutionProvider" and result.target.execution.device == "v73"
    fusion = report.fusion
    assert fusion is not None and fusion.unfused == []
    assert set(fusion.nodes_by_provider) == {"QNNExecutionProvider"}
    assert "every quantized op in a QDQ node unit" in fusion.check
    norm = "LayerNormalization" if family == "bert" else "RMSNormalization"
    assert fusion.integer_kernels["MatMul"] >= 12 and fusion.integer_kernels[norm] == 5


def test_the_htp_output_is_close_to_float(compiled):
    family, source, path, _ = compiled
    samples = _samples(family, 4, seed=1)
    htp = make_session(path, execution=HTP)
    reference = make_session(source)
    cosines = [_cosine(reference.run(None, s)[0], htp.run(None, s)[0]).mean() for s in samples]
    assert float(np.mean(cosines)) > FLOORS[family], cosines


def test_the_ep_context_model_reloads_and_gives_the_qdq_models_outputs(compiled, tmp_path):
    family, _, path, _ = compiled
    context = write_ep_context(path, HTP, tmp_path / "ctx.onnx")
    model = onnx.load(str(context))
    assert is_ep_context(model) and [n.op_type for n in model.graph.node] == ["EPContext"]
    assert {p.key: p.value for p in model.metadata_props}["edgeq.target"] == "qnn-htp"
    qdq = make_session(path, execution=HTP)
    loaded = make_session(context, execution=HTP)  # fallback disabled: the one node runs on the HTP
    for sample in _samples(family, 2, seed=2):
        np.testing.assert_array_equal(loaded.run(None, sample)[0], qdq.run(None, sample)[0])


# W4A16 (int4 weights, per channel or in blocks of 32 along K) on both Llama exports: whole on the
# HTP, rotated (the online Hadamards as quantized MatMuls), logits cosine with float measured there
# (onnxruntime-qnn 2.7, v73, these samples): before the rotation per channel 0.9774, blocks of 32
# 0.9816, both exports (random weights: int4 costs more than on a trained model, and a rotation
# gains little on weights without outliers); floors with margin.
W4_FLOORS = {None: 0.97, 32: 0.975}


@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("name", ["llama_tiny_torchscript", "llama_tiny_dynamo"])
def test_llama_w4a16_runs_whole_on_the_htp(name, group, shared_dir, tmp_path):
    source = shared_dir / f"fixtures/exports/{name}.onnx"
    options = CompileOptions(weights="int4", group=group, input_shapes=(("input_ids", (1, 48)),))
    result = edgeq.compile(source, "qnn-htp", options, calibration=_samples("llama", 8, seed=0))
    fusion = result.report.fusion
    assert fusion is not None and fusion.unfused == [] and set(fusion.nodes_by_provider) == {"QNNExecutionProvider"}
    assert result.report.scheme == ("W4A16" if group is None else f"W4A16 g{group}")
    rotation = next(row.stats for row in result.report.passes if row.name == "hadamard-rotation")
    assert rotation["stream"] == 1 and rotation["online_hadamards"] == 4 and rotation["qk_rotations"] == 0
    path = result.save(tmp_path / "w4.onnx")
    nodes = onnx.load(str(path)).graph.node
    assert not [n for n in nodes if n.op_type == "Einsum"]
    # the factors' MatMuls read a batch of [.., f1, f2] matrices: per-channel weights even under
    # --group (QNN's block-quantized MatMul takes one matrix), every weight DQ int4 or int8
    factors = [n for n in nodes if n.op_type == "DequantizeLinear" and "hadamard_factor" in n.input[0]]
    assert factors and all(not any(a.name == "block_size" and a.i for a in n.attribute) for n in factors)
    htp, reference = make_session(path, execution=HTP), make_session(source)
    cosines = [_cosine(reference.run(None, s)[0], htp.run(None, s)[0]).mean() for s in _samples("llama", 4, seed=1)]
    assert float(np.mean(cosines)) > W4_FLOORS[group], cosines


# ---- what the HTP does not take ---------------------------------------------------------------

def _c(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _model(nodes, inits, tmp_path: Path, name: str) -> Path:
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16])], inits)
    path = tmp_path / f"{name}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)
    return path


def _qdq(tensor: str, dtype, scale: float, zero: int) -> tuple[list, list]:
    nodes = [helper.make_node("QuantizeLinear", [tensor, f"{tensor}_s", f"{tensor}_z"], [f"{tensor}_q"]),
             helper.make_node("DequantizeLinear", [f"{tensor}_q", f"{tensor}_s", f"{tensor}_z"], [f"{tensor}_d"])]
    return nodes, [_c(f"{tensor}_s", np.float32(scale)), _c(f"{tensor}_z", dtype(zero))]


def test_an_op_reading_16_and_8_bits_would_run_in_float_and_is_named(tmp_path):
    """ONNX Runtime groups DQ -> Add -> Q into one integer op only when its inputs and output share
    a dtype; this Add (uint16 + uint8) would compute in float on the HTP."""
    x_nodes, x_inits = _qdq("x", np.uint16, 8 / 65535, 32768)
    y_nodes, y_inits = _qdq("a", np.uint16, 16 / 65535, 32768)
    nodes = [*x_nodes,
             helper.make_node("DequantizeLinear", ["k_q", "k_s", "k_z"], ["k_d"]),
             helper.make_node("Add", ["x_d", "k_d"], ["a"], name="mixed_add"), *y_nodes,
             helper.make_node("Identity", ["a_d"], ["y"])]
    inits = [*x_inits, *y_inits, _c("k_q", np.full((16,), 200, np.uint8)), _c("k_s", np.float32(0.01)),
             _c("k_z", np.uint8(128))]
    path = _model(nodes, inits, tmp_path, "mixed")
    with pytest.raises(ProviderError, match=r"^1 quantized node\(s\) run in float on QNNExecutionProvider, outside "
                                            r"a QDQ node unit: mixed_add \(Add\)"):
        check_placement(path, HTP)
    # the same Add with one dtype throughout is one integer op
    inits[-3:] = [_c("k_q", np.full((16,), 51400, np.uint16)), _c("k_s", np.float32(0.01 / 257)),
                  _c("k_z", np.uint16(32896))]
    report = check_placement(_model(nodes, inits, tmp_path, "uniform"), HTP)
    assert report.integer_kernels.get("Add") == 1 and report.unfused == []


def test_a_node_the_htp_does_not_take_fails_in_one_line_naming_it(tmp_path):
    x_nodes, x_inits = _qdq("x", np.uint16, 8 / 65535, 32768)
    path = _model([*x_nodes, helper.make_node("Erf", ["x_d"], ["y"], name="float_erf")], x_inits, tmp_path, "erf")
    with pytest.raises(ProviderError) as err:
        make_session(path, execution=HTP)
    message = str(err.value)
    assert "\n" not in message and "float_erf (Erf)" in message and "CPU fallback is disabled" in message
