"""int4 weights with a zero point per block (--weight-zero-points): declared per target, stored as
DequantizeLinear with int4 zero points, fused by ONNX Runtime into MatMulNBits, and closer to
weights whose blocks are not centred on zero than the symmetric blocks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.compiler import compile
from edgeq.errors import OptionError
from edgeq.options import CompileOptions
from edgeq.quant.plan import Scheme
from edgeq.registry import get_target
from edgeq.targets.base import validate
from edgeq.ir import load

K, N, BLOCK = 128, 48, 32


def _two_linears(seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul(W1) -> Relu -> MatMul(W2) -> Relu; W1's blocks are skewed (a positive offset per
    output column), where zero points pay."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((K, N)) * 0.05 + rng.uniform(0.02, 0.1, N)).astype(np.float32)
    w2 = (rng.standard_normal((N, N)) * 0.05).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="linear1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu1"),
             helper.make_node("MatMul", ["r", "w2"], ["h2"], name="linear2"),
                      helper.make_node("Relu", ["h2"], ["y"], name="relu2")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", N])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _samples(count: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{"x": rng.standard_normal((1, 6, K)).astype(np.float32)} for _ in range(count)]


def _compile(tmp_path, name: str, **options):
    # no rotation: the stored blocks are then W1's own
    opts = CompileOptions(weights="int4", group=BLOCK, activations="float", weight_rounding="rtn", rotate=False,
                          **options)
    compiled = compile(_two_linears(), "x86-vnni", opts, calibration=_samples(), provider="cpu")
    return compiled, compiled.save(tmp_path / f"{name}.onnx")


def _dequantized(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Each int4 weight DequantizeLinear's output, by weight, in numpy."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        q = inits[node.input[0]].astype(np.float32)
        if inits[node.input[0]].dtype.itemsize != 1 or q.ndim != 2:
            continue
        block = {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("block_size", 0)
        if not block:
            continue
        scale = np.repeat(inits[node.input[1]], block, axis=0)[:q.shape[0]]
        zero = np.repeat(inits[node.input[2]].astype(np.float32), block, axis=0)[:q.shape[0]] \
            if len(node.input) > 2 and node.input[2] else 0.0
        out[node.output[0]] = (q - zero) * scale
    return out


def test_zero_points_are_stored_and_fit_skewed_blocks_closer(tmp_path):
    asym, asym_path = _compile(tmp_path, "asym", weight_zero_points=True)
    sym, sym_path = _compile(tmp_path, "sym")
    assert "zero points" in asym.report.scheme and "zero points" not in sym.report.scheme
    proto = onnx.load(asym_path)
    inits = {t.name: t for t in proto.graph.initializer}
    int4_dqs = {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"
                and n.input[0] in inits and inits[n.input[0]].data_type == TensorProto.INT4}
    assert set(int4_dqs) == {"w1_dequantized", "w2_dequantized"}
    zero = numpy_helper.to_array(inits[int4_dqs["w1_dequantized"].input[2]])
    assert zero.shape == (K // BLOCK, N) and np.any(zero != 0)  # W1's positive offsets: nonzero zero points
    validate(load(asym_path), get_target("x86-vnni"))  # the target declares them
    w1 = numpy_helper.to_array(_two_linears().graph.initializer[0])
    got_asym = _dequantized(proto)["w1_dequantized"]
    got_sym = _dequantized(onnx.load(sym_path))["w1_dequantized"]
    err_asym, err_sym = (np.linalg.norm(g - w1) / np.linalg.norm(w1) for g in (got_asym, got_sym))
    assert err_asym < 0.8 * err_sym, (err_asym, err_sym)
    # ...and the compiled output is closer to the float model's, as the report's verification says
    assert asym.report.verification.worst_relative_l2 < sym.report.verification.worst_relative_l2


def test_onnxruntime_fuses_them_into_matmulnbits_with_zero_points(tmp_path):
    _, path = _compile(tmp_path, "asym", weight_zero_points=True)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx")
    # linear2 (linear1 reads the graph input, which ONNX Runtime 1.32 leaves as DQ + MatMul either way)
    nbits = [n for n in optimized.graph.node if n.op_type == "MatMulNBits"]
    assert [n.name for n in nbits] == ["linear2"] and len(nbits[0].input) >= 4 and nbits[0].input[3]
    attrs = {a.name: helper.get_attribute_value(a) for a in nbits[0].attribute}
    assert (attrs["bits"], attrs["block_size"]) == (4, BLOCK)
    x = _samples(1)[0]["x"]
    want = onnx.reference.ReferenceEvaluator(onnx.load(path)).run(None, {"x": x})[0]
    got = session.run(None, {"x": x})[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02  # MatMulNBits' int8 activations apart


def test_targets_without_zero_points_refuse_the_option():
    with pytest.raises(OptionError, match="without zero points") as err:
        Scheme.resolve(get_target("qnn-htp"), CompileOptions(weights="int4", weight_zero_points=True))
    assert "drop --weight-zero-points" in str(err.value.fix) and "\n" not in str(err.value)
    assert get_target("x86-vnni").zero_point_weights == frozenset({"int4"})
    assert get_target("arm-dotprod").zero_point_weights == frozenset({"int4"})


def test_weight_group_sets_the_block_size_of_matching_linears(tmp_path):
    compiled, path = _compile(tmp_path, "mixed", weight_zero_points=True, weight_groups=("linear1=16",))
    proto = onnx.load(path)
    blocks = {n.output[0]: {a.name: helper.get_attribute_value(a) for a in n.attribute}.get("block_size")
              for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    assert (blocks["w1_dequantized"], blocks["w2_dequantized"]) == (16, BLOCK)
    scales = {t.name: t.dims for t in proto.graph.initializer}
    assert scales["w1_scale"] == [K // 16, N] and scales["w2_scale"] == [-(-N // BLOCK), N]
    validate(load(path), get_target("x86-vnni"))
    # finer blocks on the skewed W1: closer still
    plain, _ = _compile(tmp_path, "plain", weight_zero_points=True)
    assert compiled.report.verification.worst_relative_l2 < plain.report.verification.worst_relative_l2


def test_weight_group_sets_zero_points_of_its_linears_only(tmp_path):
    compiled, path = _compile(tmp_path, "mixed", weight_groups=("linear1=16:asym", {"linear2": "32:sym"}.popitem()))
    proto = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert np.any(inits["w1_zero_point"] != 0) and not np.any(inits["w2_zero_point"] != 0)
    assert inits["w1_scale"].shape == (K // 16, N)
    stats = {p.name: p.stats for p in compiled.report.passes}["select-precision"]
    assert stats["weights in blocks of 16 with zero points (/linear1/)"] == 1
    assert stats["weights in blocks of 32 without zero points (/linear2/)"] == 1
    symmetric_only = replace(get_target("x86-vnni"), zero_point_weights=frozenset())
    with pytest.raises(OptionError, match="without zero points") as err:
        Scheme.resolve(symmetric_only, CompileOptions(weights="int4", weight_groups=("x=32:asym",)))
    assert err.value.fix == "drop :asym"


@pytest.mark.parametrize("groups,words", [
    (("linear1",), "is not REGEX=BLOCK"), (("linear1=x",), "is not REGEX=BLOCK"), (("linear1=32:zp",), "is not REGEX"),
    (("lin(=16",), "invalid --weight-group regex"), ((("linear1", 0, None),), "positive integer"),
])
def test_bad_weight_groups_are_one_line_option_errors(groups, words):
    with pytest.raises(OptionError, match=words.replace("(", r"\(")) as err:
        CompileOptions(weights="int4", weight_groups=groups)
    assert "\n" not in str(err.value)


def test_a_block_size_the_kernel_rejects_is_refused():
    with pytest.raises(OptionError, match="block"):
        compile(_two_linears(), "x86-vnni", CompileOptions(weights="int4", activations="float", rotate=False,
                                                           weight_rounding="rtn", weight_groups={"linear1": 24}),
                calibration=_samples(), provider="cpu")
