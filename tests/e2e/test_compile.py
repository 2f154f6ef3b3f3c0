"""`edgeq.compile` end to end on the synthetic BERT and Llama for every x86 target and scheme:
error floors, fusion, target validation, determinism, and the input left untouched."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest

import edgeq
from edgeq.compiler import Compiled, compile
from edgeq.errors import ValidationError
from edgeq.ir import clone_graph, graph_to_proto
from edgeq.options import CompileOptions
from edgeq.registry import get_target
from edgeq.targets.base import Target, validate
from tests.passes.helpers import assert_valid

TARGETS = ("x86-vnni", "x86-avx2", "x86-amx")
# W4A16 without the x86 targets' default rotation: on these 0.6 MB models its online Hadamard
# matrices outweigh the int4 savings (rotation has its own tests).
SCHEMES = {"W8A8": {}, "W4A16": {"weights": "int4", "activations": "float", "rotate": False},
           "W8A16": {"activations": "int16"}}
# Worst relative L2 error vs float on the 2 held-out samples: the measured value times about 1.5.
# Llama cases hit by the opset bug were measured on the same model converted to opset 21 with
# onnx.version_converter (identical W8A8 vnni/amx error, 0.27766, on both versions).
FLOORS = {
    ("bert", "W8A8"): 0.015,    # measured 0.00814 (vnni, amx), 0.00785 (avx2, 7-bit weights)
    ("bert", "W4A16"): 0.015,   # measured 0.00954 (all three)
    ("bert", "W8A16"): 0.015,   # measured 0.00831 (vnni, amx), 0.00805 (avx2)
    ("llama", "W8A8"): 0.42,    # measured 0.278 (vnni, amx): planted activation and weight outliers
    ("llama", "W4A16"): 0.16,   # measured 0.104 (all three, opset-21 conversion)
    ("llama", "W8A16"): 0.17,   # measured 0.111 (vnni, amx, opset-21 conversion)
}
# 7-bit weights cost accuracy on the outlier-laden Llama: measured 0.446 (W8A8), 0.308 (W8A16), opset 21.
FLOORS_AVX2 = {("llama", "W8A8"): 0.65, ("llama", "W8A16"): 0.46}
OPSET_BUG = ("BUG passes/insert_qdq.py _raise_opset: int4/int16 (and 7-bit avx2) quantization raises the opset "
             "from 17 to 21 without converting ops, so Llama's ReduceMean(axes=...) becomes invalid and ORT "
             "refuses the compiled model")


def _hits_opset_bug(model: str, target: str, scheme: str) -> bool:
    return model == "llama" and (scheme != "W8A8" or target == "x86-avx2")


CASES = [pytest.param(m, t, s, id=f"{m}-{t}-{s}",
                      )
         for m in ("bert", "llama") for t in TARGETS for s in SCHEMES]


@pytest.fixture(scope="module")
def compiled(synthetic_bert, synthetic_llama, bert_samples, llama_samples):
    """compiled(model, target, scheme) -> Compiled, each compiled once per module."""
    cache: dict[tuple, Compiled] = {}
    sources = {"bert": (synthetic_bert, bert_samples), "llama": (synthetic_llama, llama_samples)}

    def get(model: str, target: str, scheme: str) -> Compiled:
        key = (model, target, scheme)
        if key not in cache:
            path, samples = sources[model]
            cache[key] = compile(path, target, CompileOptions(**SCHEMES[scheme]), calibration=samples)
        return cache[key]

    return get


def test_edgeq_compile_is_the_package_entry_point(synthetic_bert, bert_samples):
    compiled = edgeq.compile(synthetic_bert, "x86-vnni", CompileOptions(), calibration=bert_samples)
    assert compiled.report.quantized_ops.get("Gemm", 0) + compiled.report.quantized_ops.get("MatMul", 0) > 0


@pytest.mark.parametrize("model,target,scheme", CASES)
def test_compile_verified_below_floor(compiled, model, target, scheme):
    result = compiled(model, target, scheme)
    report = result.report
    bits = "7" if target == "x86-avx2" and scheme != "W4A16" else "4" if scheme == "W4A16" else "8"
    assert report.scheme.startswith(f"W{bits}")
    assert report.target == target
    assert report.verification is not None
    assert report.verification.samples == 2 and not report.verification.synthetic_inputs
    floor = FLOORS_AVX2.get((model, scheme), FLOORS[model, scheme]) if target == "x86-avx2" else FLOORS[model, scheme]
    error = report.verification.worst_relative_l2
    assert error < floor, f"{model} {target} {scheme}: relative L2 {error:.4f} >= floor {floor}"
    assert report.quantized_ops.get("MatMul", 0) + report.quantized_ops.get("Gemm", 0) > 0
    assert 0 < report.compiled_bytes < report.float_bytes
    assert validate(result.graph, result.target) == []
    assert_valid(result.graph)


def _weight_q_arrays(result: Compiled) -> list[np.ndarray]:
    """The integer weights of linear layers (DQ of an initializer read by MatMul/Gemm)."""
    graph, arrays = result.graph, []
    for dq in graph.ops_of_type("DequantizeLinear"):
        q = graph.inputs_of(dq)[0]
        if q.const is None or q.const.elem_type != onnx.TensorProto.INT8:
            continue
        readers = graph.consumers(graph.outputs_of(dq)[0])
        if readers and all(r.op_type in ("MatMul", "Gemm") for r in readers):
            arrays.append(q.const.numpy())
    return arrays


@pytest.mark.parametrize("model", ["bert", "llama"])
def test_avx2_weights_stay_within_7_bits(compiled, model):
    weights = _weight_q_arrays(compiled(model, "x86-avx2", "W8A8"))
    assert len(weights) >= 12
    assert min(int(w.min()) for w in weights) >= -64 and max(int(w.max()) for w in weights) <= 63
    assert max(int(np.abs(w).max()) for w in weights) >= 63  # the range is used, not just respected
    # VNNI has no saturation problem: its weights use the full symmetric int8 range.
    vnni = _weight_q_arrays(compiled(model, "x86-vnni", "W8A8"))
    assert max(int(np.abs(w).max()) for w in vnni) == 127


def test_bert_vnni_w8a8_every_quantized_op_is_fused(compiled):
    report = compiled("bert", "x86-vnni", "W8A8").report
    assert report.fusion is not None
    assert report.fusion.unfused == []
    # 12 linear layers and 4 attention matmuls run as integer kernels.
    assert sum(report.fusion.integer_kernels.values()) >= 16
    text = "\n".join(report.summary_lines())
    assert "every quantized compute op fused into an integer kernel" in text and "UNFUSED" not in text


def test_report_records_every_pipeline_pass(compiled):
    result = compiled("bert", "x86-vnni", "W8A8")
    names = [r.name for r in result.report.passes]
    assert names == list(result.target.default_pipeline)
    assert all(r.seconds >= 0 for r in result.report.passes)
    assert result.report.kept_high and result.report.roles["LayerNorm"] == 5


# ---- validate ----------------------------------------------------------------------------


def _first_weight_dq(graph):
    for dq in graph.ops_of_type("DequantizeLinear"):
        q, scale, zero = graph.inputs_of(dq)
        if q.const is not None and q.const.elem_type == onnx.TensorProto.INT8 and dq.attr("axis") is not None \
                and all(r.op_type in ("MatMul", "Gemm") for r in graph.consumers(graph.outputs_of(dq)[0])):
            return dq, q, scale, zero
    raise AssertionError("no per-channel weight DequantizeLinear found")


def test_validate_rejects_a_nonzero_zero_point_on_a_symmetric_weight(compiled):
    graph = clone_graph(compiled("bert", "x86-vnni", "W8A8").graph)
    dq, _, _, zero = _first_weight_dq(graph)
    broken = zero.const.numpy().copy()
    broken[0] = 3
    graph.set_const(zero, broken)
    with pytest.raises(ValidationError, match="zero point is not 0 but the target needs symmetric"):
        validate(graph, get_target("x86-vnni"))
    violations = validate(graph, get_target("x86-vnni"), raise_on_error=False)
    assert [v.node for v in violations] == [dq.name]


def _pow2_target() -> Target:
    base = get_target("x86-vnni")
    weight = base.weight.replace(scale_pow2=True)
    ops = {kind: rule if rule.weight is None or kind == "Gather" else dataclasses.replace(rule, weight=weight)
           for kind, rule in base.ops.items()}
    return dataclasses.replace(base, name="test-x86-pow2", ops=ops, weight=weight)


def test_validate_rejects_a_scale_that_is_not_a_power_of_two(compiled, synthetic_bert, bert_samples):
    target = _pow2_target()
    # A model compiled for x86-vnni has arbitrary weight scales: not acceptable here.
    with pytest.raises(ValidationError, match="scale is not a power of two"):
        validate(compiled("bert", "x86-vnni", "W8A8").graph, target)
    # Compiled for the pow2 target itself it passes, until one scale is nudged.
    result = compile(synthetic_bert, target, CompileOptions(verify=False), calibration=bert_samples)
    assert validate(result.graph, target) == []
    _, _, scale, _ = _first_weight_dq(result.graph)
    values = scale.const.numpy()
    assert np.all(np.log2(values) == np.round(np.log2(values)))
    result.graph.set_const(scale, values * np.float32(1.1))
    with pytest.raises(ValidationError, match="scale is not a power of two"):
        validate(result.graph, target)


def test_validate_rejects_a_dtype_the_target_lacks(compiled):
    graph = clone_graph(compiled("bert", "x86-vnni", "W8A8").graph)
    _, q, _, zero = _first_weight_dq(graph)
    graph.set_const(q, q.const.numpy().astype(np.uint16))
    graph.set_const(zero, zero.const.numpy().astype(np.uint16))
    target = dataclasses.replace(get_target("x86-vnni"), activation_dtypes=frozenset({"uint8", "int8"}))
    with pytest.raises(ValidationError, match="dtype uint16 is not supported"):
        validate(graph, target)


# ---- determinism, input untouched ------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("model,scheme", [("bert", "W8A8"), ("llama", "W8A8"), ("bert", "W4A16")])
def test_compiling_twice_gives_byte_identical_files(tmp_path, model, scheme, synthetic_bert, synthetic_llama,
                                                   bert_samples, llama_samples):
    path, samples = (synthetic_bert, bert_samples) if model == "bert" else (synthetic_llama, llama_samples)
    outputs = []
    for i in range(2):
        result = compile(path, "x86-vnni", CompileOptions(verify=False, **SCHEMES[scheme]), calibration=samples)
        outputs.append(result.save(tmp_path / f"out{i}.onnx"))
    assert outputs[0].read_bytes() == outputs[1].read_bytes()


def test_the_input_file_is_never_modified(tmp_path, synthetic_bert, bert_samples):
    path = tmp_path / "model.onnx"
    path.write_bytes(synthetic_bert.read_bytes())
    before, mtime = _sha(path), path.stat().st_mtime_ns
    result = compile(path, "x86-vnni", CompileOptions(smooth_alpha=0.5), calibration=bert_samples)
    result.save(tmp_path / "compiled.onnx")
    assert _sha(path) == before and path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compiled.onnx", "model.onnx"]


def test_in_memory_inputs_are_never_modified(synthetic_bert, bert_samples):
    proto = onnx.load(str(synthetic_bert))
    proto_bytes = proto.SerializeToString()
    compile(proto, "x86-vnni", CompileOptions(verify=False, smooth_alpha=0.5), calibration=bert_samples)
    assert proto.SerializeToString() == proto_bytes
    graph = edgeq.load(synthetic_bert)
    graph_bytes = graph_to_proto(graph).SerializeToString()
    compile(graph, "x86-vnni", CompileOptions(verify=False, smooth_alpha=0.5), calibration=bert_samples)
    assert graph_to_proto(graph).SerializeToString() == graph_bytes
