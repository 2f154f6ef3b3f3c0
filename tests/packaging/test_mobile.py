"""`edgeq package --platform android|ios`: the .ort model must compute exactly what the .onnx it
came from computes (loaded in ONNX Runtime, same provider and level), keep every QDQ node unit
where the package is for a provider that lowers them, the operator config must list every op of
the .ort graph, the usability report must say what each mobile provider takes, and the folder is
written whole, deterministically, or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeq
from edgeq.cli import main
from edgeq.options import CompileOptions
from edgeq.packaging import mobile as mobile_mod
from edgeq.packaging import ort_format
from edgeq.packaging.folder import PackageError
from edgeq.packaging.mobile import MobileOptions, package_mobile
from edgeq.packaging.mobile_providers import _XnnpackChecker

FIXTURE = "fixtures/exports/bert_tiny_torchscript.onnx"


def _samples(length: int, count: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        mask = np.ones((1, length), np.int64)
        mask[0, length - 4 - i % 4:] = 0 if i % 2 else 1
        samples.append({"input_ids": rng.integers(0, 1000, (1, length)).astype(np.int64), "attention_mask": mask,
                        "token_type_ids": np.zeros((1, length), np.int64)})
    return samples


@pytest.fixture(scope="module", params=["x86-vnni", "arm-dotprod"])
def compiled(request, shared_dir, tmp_path_factory) -> Path:
    """The BERT fixture compiled W8A8 for an x86 and an ARM target (input shapes recorded: 1 x 16)."""
    result = edgeq.compile(shared_dir / FIXTURE, request.param, CompileOptions(), calibration=_samples(16))
    return result.save(tmp_path_factory.mktemp("mobile") / f"bert.{request.param}.onnx")


@pytest.fixture(scope="module")
def x86(shared_dir, tmp_path_factory) -> Path:
    result = edgeq.compile(shared_dir / FIXTURE, "x86-vnni", CompileOptions(), calibration=_samples(16))
    return result.save(tmp_path_factory.mktemp("mobile") / "bert.x86-vnni.onnx")


def _facts(folder: Path) -> dict:
    return json.loads((folder / "model_facts.json").read_text())


def _usability(folder: Path) -> dict:
    return json.loads((folder / "mobile_usability.json").read_text())


def _feeds(length: int = 16) -> dict[str, np.ndarray]:
    return {k: v for k, v in _samples(length, 1)[0].items()}


def _session(path: Path, level: str | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if level is not None:
        options.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    options.add_session_config_entry("session.qdqisint8allowed", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("provider,level", [("cpu", "all"), ("nnapi", "basic")])
def test_the_ort_model_gives_the_onnx_models_outputs_exactly(compiled, provider, level, tmp_path):
    package_mobile(compiled, tmp_path / "pkg", MobileOptions("android", provider=provider))
    facts = _facts(tmp_path / "pkg")
    assert facts["ort_format"]["optimization_level"] == level
    assert facts["check"]["max_abs_diff"] == 0.0 and facts["check"]["identical"] is True
    # and independently of the package's own check, on other data:
    feeds = _feeds()
    from_ort = _session(tmp_path / "pkg" / "model.ort", None).run(None, feeds)[0]
    from_onnx = _session(compiled, level).run(None, feeds)[0]
    assert from_ort.shape == (1, 16, 128) and np.array_equal(from_ort, from_onnx)


def test_basic_level_keeps_every_qdq_node_unit_and_cpu_level_fuses_them(x86, tmp_path):
    package_mobile(x86, tmp_path / "nnapi", MobileOptions("android", provider="nnapi"))
    package_mobile(x86, tmp_path / "cpu", MobileOptions("android", provider="cpu"))
    source = onnx.load(str(x86))
    counts = {op: sum(n.op_type == op for n in source.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    basic = ort_format.op_types(ort_format.ort_ops(tmp_path / "nnapi" / "model.ort"))
    fused = ort_format.op_types(ort_format.ort_ops(tmp_path / "cpu" / "model.ort"))
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > 0
    assert basic["QuantizeLinear"] == counts["QuantizeLinear"]
    assert basic["DequantizeLinear"] >= counts["DequantizeLinear"]  # shared DQs duplicated per node unit
    assert not any(op.startswith("com.microsoft") for op in basic)
    assert fused.get("DequantizeLinear", 0) == 0 and fused["com.microsoft:QGemm"] == 12
    assert _facts(tmp_path / "nnapi")["ort_format"]["qdq"] == {"onnx": counts, "ort": {
        "QuantizeLinear": basic["QuantizeLinear"], "DequantizeLinear": basic["DequantizeLinear"]}}


def test_the_operator_config_lists_every_op_of_the_model(x86, tmp_path):
    from onnxruntime.tools.reduced_build_config_parser import parse_config

    package_mobile(x86, tmp_path / "pkg", MobileOptions("android"))
    folder = tmp_path / "pkg"
    config = folder / "required_operators_and_types.config"
    text = config.read_text()
    assert "/" not in "".join(line for line in text.splitlines() if line.startswith("#")).replace("model/s", "")
    required, _ = parse_config(str(config), enable_type_reduction=True)
    ops = ort_format.ort_ops(folder / "model.ort")
    assert sum(ops.values()) == _facts(folder)["ort_format"]["nodes"]
    for domain, version, op in ops:
        assert op in required[domain][version], (domain, version, op)
    assert _facts(folder)["operator_config"]["model_ops_checked"] == len(ops)
    # a config missing an op of the model is refused
    cut = tmp_path / "cut.config"
    cut.write_text("\n".join(line for line in text.splitlines() if "QGemm" not in line) + "\n")
    with pytest.raises(PackageError, match="QGemm"):
        ort_format.check_op_config(folder / "model.ort", cut)


def test_the_usability_report_says_what_each_provider_takes(x86, tmp_path):
    package_mobile(x86, tmp_path / "android", MobileOptions("android"))
    package_mobile(x86, tmp_path / "ios", MobileOptions("ios"))
    android, ios = _usability(tmp_path / "android"), _usability(tmp_path / "ios")
    names = [p["provider"] for p in android["providers"]]
    assert names[0] == "nnapi" and names[-2:] == ["xnnpack", "cpu"]
    assert [p["provider"] for p in ios["providers"]] == ["coreml", "coreml-neuralnetwork", "xnnpack", "cpu"]
    by = {p["provider"]: p for p in android["providers"]}
    fixed = {p["provider"]: p for p in android["with_recorded_shapes_fixed"]["providers"]}
    assert android["with_recorded_shapes_fixed"]["shapes"]["input_ids"] == [1, 16]
    assert by["cpu"]["share"] == 1.0
    # dynamic [batch, seq] inputs: NNAPI refuses most nodes for their shapes; fixed, it takes all but
    # the ops its table lacks (LayerNormalization, Gelu)
    assert by["nnapi"]["dynamic_shape_nodes"] > 0 and fixed["nnapi"]["dynamic_shape_nodes"] == 0
    assert fixed["nnapi"]["taken"] > by["nnapi"]["taken"] and fixed["nnapi"]["share"] > 0.9
    assert {"ai.onnx:LayerNormalization", "ai.onnx:Gelu"} <= set(fixed["nnapi"]["ops_not_taken"])
    # CoreML's tables have no QuantizeLinear/DequantizeLinear
    assert "ai.onnx:DequantizeLinear" in {p["provider"]: p for p in ios["providers"]}["coreml"]["ops_not_taken"]
    # XNNPACK leaves QDQ MatMuls to the CPU provider
    assert "ai.onnx:MatMul" in fixed["xnnpack"]["ops_not_taken"] and fixed["xnnpack"]["share"] < 0.1
    readme = (tmp_path / "android" / "README.md").read_text()
    assert "- nnapi: " in readme and "OrtSession.SessionOptions()" in readme
    assert "appendCoreMLExecutionProvider" not in readme
    assert "ORTSession(" in (tmp_path / "ios" / "README.md").read_text()


def test_xnnpack_takes_float_matmuls_with_constant_weights_and_qdq_softmax_units():
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    z = numpy_helper.from_array(np.array(0, np.uint8), "z")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="float_matmul"),
             helper.make_node("QuantizeLinear", ["a", "s", "z"], ["aq"], name="q0"),
             helper.make_node("DequantizeLinear", ["aq", "s", "z"], ["ad"], name="dq0"),
             helper.make_node("Softmax", ["ad"], ["b"], name="qdq_softmax"),
             helper.make_node("QuantizeLinear", ["b", "s", "z"], ["bq"], name="q1"),
             helper.make_node("DequantizeLinear", ["bq", "s", "z"], ["bd"], name="dq1"),
             helper.make_node("MatMul", ["bd", "ad"], ["y"], name="qdq_matmul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], [w, s, z])
    checker = _XnnpackChecker(graph)
    taken = {n.name for n in graph.node if checker.is_op_supported(n)}
    assert taken == {"float_matmul", "dq0", "qdq_softmax", "q1"}


def test_facts_give_the_app_its_inputs_outputs_and_quantization(x86, shared_dir, tmp_path):
    tokenizer = shared_dir / "reference" / "smollm2_tokenizer.json"
    package = package_mobile(x86, tmp_path / "pkg", MobileOptions("android"), tokenizer=tokenizer)
    facts = _facts(tmp_path / "pkg")
    assert [i["name"] for i in facts["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(i["dtype"] == "int64" and i["recorded_shape"] == [1, 16] for i in facts["inputs"])
    assert facts["outputs"] == [{"name": "last_hidden_state", "dtype": "float32", "shape": ["batch", "seq", 128]}]
    assert facts["target"] == "x86-vnni" and facts["quantization"]["scheme"] == "W8A8"
    assert facts["quantization"]["weight_dequantize_by_dtype"]["int8"] >= 12
    assert facts["quantization"]["activation_quantize_by_dtype"] == {"uint8": 16}
    assert facts["tokenizer"]["class"] == "GPT2Tokenizer" and facts["tokenizer"]["eos_token_id"] is not None
    assert {f.name for f in package.files} == {"model.ort", "required_operators_and_types.config", "model_facts.json",
                                               "mobile_usability.json", "README.md", "tokenizer.json",
                                               "tokenizer_config.json"}
    assert (tmp_path / "pkg" / "tokenizer.json").read_bytes() == tokenizer.read_bytes()


def test_quantized_graph_inputs_and_outputs_carry_their_scales(tmp_path):
    """A model whose input is read by a QuantizeLinear and whose output a DequantizeLinear writes
    (an integer-only datapath): the app can feed and read the integers with these."""
    s_in = numpy_helper.from_array(np.array(0.05, np.float32), "s_in")
    z_in = numpy_helper.from_array(np.array(128, np.uint8), "z_in")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_in", "z_in"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s_in", "z_in"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [s_in, z_in])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "q.onnx"))
    package_mobile(tmp_path / "q.onnx", tmp_path / "pkg", MobileOptions("ios"))
    facts = _facts(tmp_path / "pkg")
    assert facts["inputs"][0]["quantized_as"] == {"scale": pytest.approx(0.05), "zero_point": 128, "dtype": "uint8"}
    assert facts["outputs"][0]["dequantized_from"]["zero_point"] == 128
    assert facts["target"] is None and facts["check"]["identical"]


def test_the_package_is_deterministic(x86, tmp_path):
    for name in ("a", "b"):
        package_mobile(x86, tmp_path / name, MobileOptions("android", provider="nnapi"))
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        if name != "model.ort":  # ONNX Runtime's flatbuffer table order varies: compare its graph
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (ort_format.ort_graph_signature(tmp_path / "a" / "model.ort")
            == ort_format.ort_graph_signature(tmp_path / "b" / "model.ort"))


def test_static_shapes_fix_the_inputs_and_keep_the_outputs(x86, tmp_path):
    package_mobile(x86, tmp_path / "pkg", MobileOptions("android", provider="nnapi", static_shapes=True))
    facts = _facts(tmp_path / "pkg")
    assert all(i["shape"] == [1, 16] for i in facts["inputs"]) and facts["outputs"][0]["shape"] == [1, 16, 128]
    assert facts["check"]["identical"]
    usability = _usability(tmp_path / "pkg")
    assert "with_recorded_shapes_fixed" not in usability
    assert {p["provider"]: p for p in usability["providers"]}["nnapi"]["dynamic_shape_nodes"] == 0
    session = _session(tmp_path / "pkg" / "model.ort", None)
    assert [i.shape for i in session.get_inputs()] == [[1, 16]] * 3


def test_a_failed_package_leaves_nothing(x86, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise PackageError("broken on purpose")

    monkeypatch.setattr(mobile_mod, "readme", broken)
    with pytest.raises(PackageError, match="broken on purpose"):
        package_mobile(x86, tmp_path / "pkg", MobileOptions("android"))
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_package_and_refuses_bad_input_in_one_line(x86, shared_dir, tmp_path, capsys):
    out = tmp_path / "pkg"
    assert main(["package", str(x86), "-o", str(out), "--platform", "android", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {f["name"] for f in listed["files"]} == {p.name for p in out.iterdir()}
    cases = [
        ([str(x86), "-o", str(out), "--platform", "android"], "not empty"),
        ([str(x86), "-o", str(tmp_path / "b"), "--platform", "android", "--genai"], "choose one packaging mode"),
        ([str(x86), "-o", str(tmp_path / "b"), "--platform", "ios", "--provider", "nnapi"], "no provider 'nnapi'"),
        ([str(x86), "-o", str(tmp_path / "b"), "--platform", "ios", "--target", "qnn-htp"],
         "rule(s) of target qnn-htp"),
        ([str(x86), "-o", str(tmp_path / "b"), "--platform", "ios", "--input-shape", "nope=1,2"], "no input nope"),
        ([str(x86), "-o", str(tmp_path / "b"), "--genai", "--static-shapes"], "applies to --platform only"),
        ([str(x86), "-o", str(tmp_path / "b"), "--platform", "ios", "--ep-context"], "no EP-context model"),
        ([str(shared_dir / "reference" / "minilm_sentences.txt"), "-o", str(tmp_path / "b"), "--platform", "ios"],
         "not an ONNX model"),
    ]
    for argv, message in cases:
        assert main(["package", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "b").exists()


def test_qnn_htp_package_has_the_ep_context_model_and_runs_on_the_htp(shared_dir, tmp_path):
    pytest.importorskip("onnxruntime_qnn")
    from edgeq.runtime.ep_context import is_ep_context

    result = edgeq.compile(shared_dir / FIXTURE, "qnn-htp", CompileOptions(input_shapes=(("input_ids", (1, 32)),)),
                           calibration=_samples(32))
    path = result.save(tmp_path / "bert.qnn-htp.onnx")
    package = package_mobile(path, tmp_path / "pkg", MobileOptions("android"))
    facts = _facts(tmp_path / "pkg")
    assert facts["provider"]["onnxruntime"] == "QNNExecutionProvider" and facts["device"] == "v73"
    assert facts["ort_format"]["optimization_level"] == "basic" and facts["check"]["identical"]
    assert facts["check"]["on_provider"] == {"provider": "QNNExecutionProvider", "device": "v73",
                                             "max_abs_diff": 0.0, "ep_context_max_abs_diff": 0.0}
    assert is_ep_context(onnx.load(str(tmp_path / "pkg" / "model_ctx.onnx")))
    assert "ep-context" in {f.role for f in package.files}
    qnn = {p["provider"]: p for p in _usability(tmp_path / "pkg")["providers"]}["qnn"]
    assert qnn["share"] == 1.0 and qnn["partitions"] == 1 and qnn["suitability"] == "YES"
    assert 'addQnn(mapOf("backend_path" to "libQnnHtp.so"))' in (tmp_path / "pkg" / "README.md").read_text()


def test_int4_weights_package_for_the_cpu_provider_and_are_refused_unfused(shared_dir, tmp_path, capsys):
    """The .ort schema has no int4 type: W4 weights stay 4-bit only fused into MatMulNBits (the CPU
    provider's "all" level); a package that would keep the int4 DequantizeLinear nodes is refused."""
    options = CompileOptions(weights="int4", activations="float", weight_rounding="rtn")
    path = edgeq.compile(shared_dir / FIXTURE, "arm-dotprod", options, calibration=_samples(16)).save(
        tmp_path / "bert.w4a16.onnx")
    package_mobile(path, tmp_path / "cpu", MobileOptions("android"))
    facts = _facts(tmp_path / "cpu")
    assert facts["check"]["identical"] and facts["ort_format"]["ops"]["com.microsoft:MatMulNBits"] == 12
    assert facts["quantization"]["weight_dequantize_by_dtype"]["int4"] == 12
    assert main(["package", str(path), "-o", str(tmp_path / "nnapi"), "--platform", "android",
                 "--provider", "nnapi"]) == 2
    err = capsys.readouterr().err
    assert "int4 weight(s)" in err and "--provider cpu" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "nnapi").exists()
