"""select-precision: what runs in integer, what stays high and why; user overrides; the ORT
nodes_to_exclude and TensorQuantOverrides files."""

from __future__ import annotations

import json

import pytest

from edgeq.errors import OptionError, PassError
from edgeq.options import CompileOptions, PrecisionOverrides, TensorOverride
from edgeq.pipeline import PassContext, PassManager
from edgeq.passes.select_precision import SelectPrecision
from edgeq.frontend.patterns import Role
from edgeq.registry import get_pass, get_target
from edgeq.targets.base import Granularity
from edgeq.pipeline.artifacts import QUANT_PLAN
from tests.passes.helpers import PREPROCESS

LAYERS = (0, 1)
BERT_LINEARS = {f"/encoder/layer.{i}/{p}/MatMul" for i in LAYERS
                for p in ("attention/self/query", "attention/self/key", "attention/self/value",
                          "attention/output/dense", "intermediate/dense", "output/dense")}
BERT_ATTENTION = {f"/encoder/layer.{i}/attention/self/{m}" for i in LAYERS for m in ("MatMul", "MatMul_1")}
BERT_EMBEDDING_GATHERS = 3


def _plan(graph, target="x86-vnni", options: CompileOptions | None = None):
    ctx = PassContext(target=get_target(target))
    PassManager([get_pass(n)() for n in PREPROCESS] + [SelectPrecision(options)])(graph, ctx)
    return ctx.artifacts[QUANT_PLAN]


def _quantized(plan) -> dict[str, object]:
    return {p.op.name: p for p in plan.ops}


def _kept(plan) -> dict[str, str]:
    return {op.name: reason for op, reason in plan.kept_high}


def test_bert_w8a8_quantizes_linears_attention_and_embeddings(bert_graph):
    plan = _plan(bert_graph)
    assert plan.scheme.label.startswith("W8A8")
    quantized = _quantized(plan)
    matmuls = {n for n, p in quantized.items() if p.op.op_type == "MatMul"}
    assert matmuls == BERT_LINEARS | BERT_ATTENTION
    gathers = [p for p in plan.ops if p.op.op_type == "Gather"]
    assert len(gathers) == BERT_EMBEDDING_GATHERS
    target = get_target("x86-vnni")
    for name in BERT_LINEARS:
        p = quantized[name]
        assert p.activations == {0: target.activation}  # uint8 asymmetric per tensor
        assert p.weights == {1: target.weight}          # int8 symmetric per channel
        assert target.weight.granularity == Granularity.CHANNEL and target.weight.symmetric
    matmul_rule = target.rule("MatMul")
    for name in BERT_ATTENTION:  # activation x activation: both inputs as the target's MatMul rule says
        p = quantized[name]
        assert set(p.activations) == {0, 1} and not p.weights
        assert (p.activations[0], p.activations[1]) == matmul_rule.activations[:2]
        assert p.activations[0].dtype in ("uint8", "int8") and p.activations[1].dtype in ("uint8", "int8")
    for p in gathers:
        assert set(p.weights) == {0} and not p.activations


def test_bert_kept_high_with_reasons(bert_graph):
    plan = _plan(bert_graph)
    kept = _kept(plan)
    reasons = {}
    for name, reason in kept.items():
        reasons.setdefault(reason, set()).add(name)
    layer_norms = {op.name for op in bert_graph.ops_of_type("LayerNormalization")}
    softmaxes = {op.name for op in bert_graph.ops_of_type("Softmax")}
    assert reasons["LayerNorm stays float32"] == layer_norms and len(layer_norms) == 5
    assert reasons["Softmax stays float32"] == softmaxes and len(softmaxes) == 2
    assert {f"/encoder/layer.{i}/{m}/Add" for i in LAYERS for m in ("attention/output", "output")} \
        <= reasons["ResidualAdd stays float32"]
    # The Gather that picks a dimension out of a shape is no embedding table.
    non_embedding = [op for op in bert_graph.ops_of_type("Gather") if op.name not in _quantized(plan)]
    assert len(non_embedding) == 1 and kept[non_embedding[0].name] == "not an embedding table"
    assert not set(kept) & set(_quantized(plan))  # nothing is both


def test_kept_high_ops_say_the_precision_they_run_in(bert_graph):
    # ORT's CPU provider runs ops kept high in the model's float dtype on every x86 target (AMX's
    # BF16 is a note, not an execution precision).
    kept = set(_kept(_plan(bert_graph, "x86-amx")).values())
    assert {"LayerNorm stays float32", "Softmax stays float32"} <= kept


def test_llama_rms_norms_kept_high_and_lm_head_quantized(llama_graph):
    plan = _plan(llama_graph)
    kept = _kept(plan)
    rms_ops = [op for op, role in plan.roles.of_op.items() if role == Role.RMS_NORM]
    assert len(rms_ops) == 5 * 7
    assert all(kept[op.name] == "RMSNorm stays float32" for op in rms_ops)
    assert "/lm_head/MatMul" in _quantized(plan)


@pytest.mark.parametrize("overrides,excluded,reason", [
    (PrecisionOverrides(exclude_nodes=("/encoder/layer.0/attention/self/query/MatMul",)),
     {"/encoder/layer.0/attention/self/query/MatMul"}, "excluded by name"),
    (PrecisionOverrides(exclude_regex=(r"layer\.1/.*dense/MatMul",)),
     {f"/encoder/layer.1/{p}/MatMul" for p in ("attention/output/dense", "intermediate/dense", "output/dense")},
     r"name matches /layer\.1/.*dense/MatMul/"),
    (PrecisionOverrides(exclude_op_types=("Gather",)), None, "op type Gather excluded"),
])
def test_user_overrides_keep_ops_high_with_the_reason(bert_graph, overrides, excluded, reason):
    plan = _plan(bert_graph, options=CompileOptions(overrides=overrides))
    if excluded is None:
        excluded = {op.name for op in bert_graph.ops_of_type("Gather")}
    kept = _kept(plan)
    assert {n for n, r in kept.items() if r == reason} == excluded
    quantized = set(_quantized(plan))
    assert not quantized & excluded
    baseline = set(_quantized(_plan(bert_graph)))  # the same graph again: nothing else changed
    assert quantized == baseline - excluded


def test_weight_only_int4_plans_blocks_only_where_k_holds_a_block(bert_graph):
    plan = _plan(bert_graph, options=CompileOptions(weights="int4", activations="float"))
    assert plan.scheme.label.startswith("W4")
    quantized = _quantized(plan)
    matmuls = {n for n, p in quantized.items() if p.op.op_type == "MatMul"}
    # Default block 128: only output.dense (K = intermediate 256) has K >= 128.
    assert matmuls == {f"/encoder/layer.{i}/output/dense/MatMul" for i in LAYERS}
    for p in quantized.values():
        assert not p.activations
    spec = quantized["/encoder/layer.0/output/dense/MatMul"].weights[1]
    assert (spec.dtype, spec.granularity, spec.block_size) == ("int4", Granularity.BLOCK, 128)
    assert _kept(plan)["/encoder/layer.0/attention/self/query/MatMul"] == "nothing to quantize"


def test_weight_only_int4_group_32_covers_every_linear(bert_graph):
    plan = _plan(bert_graph, options=CompileOptions(weights="int4", group=32, activations="float"))
    matmuls = {p.op.name for p in plan.ops if p.op.op_type == "MatMul"}
    assert matmuls == BERT_LINEARS  # attention matmuls have no weight: nothing to do weight-only
    assert {p.weights[1].block_size for p in plan.ops if p.op.op_type == "MatMul"} == {32}


@pytest.mark.parametrize("head_weights", ["int8", "int4"])
def test_int4_presets_keep_the_lm_head_int8_unless_asked(llama_graph, head_weights):
    plan = _plan(llama_graph, options=CompileOptions(weights="int4", group=32, activations="float",
                                                     head_weights=head_weights))
    specs = {p.op.name: p.weights[1] for p in plan.ops if p.op.op_type == "MatMul"}
    head = specs.pop("/lm_head/MatMul")
    assert specs and {(s.dtype, s.block_size) for s in specs.values()} == {("int4", 32)}
    if head_weights == "int8":
        assert (head.dtype, head.granularity) == ("int8", Granularity.CHANNEL)
    else:
        assert (head.dtype, head.block_size) == ("int4", 32)


def test_int16_activations(bert_graph):
    plan = _plan(bert_graph, options=CompileOptions(activations="int16"))
    assert plan.scheme.label.startswith("W8A16")
    widened = {"uint8": "uint16", "int8": "int16"}
    rule = get_target("x86-vnni").rule("MatMul")
    for p in plan.ops:
        if p.op.op_type == "MatMul":
            assert {s: spec.dtype for s, spec in p.activations.items()} == \
                {s: widened[rule.activations[s].dtype] for s in p.activations}
            assert all(spec.qrange is None for spec in p.activations.values())
    assert {spec.dtype for p in plan.ops for spec in p.activations.values()} <= {"uint16", "int16"}
    assert any(p.activations for p in plan.ops)


def test_avx2_weights_are_seven_bit(bert_graph):
    plan = _plan(bert_graph, "x86-avx2")
    specs = {p.weights[1] for p in plan.ops if p.op.op_type == "MatMul" and 1 in p.weights}
    assert {(s.qmin, s.qmax) for s in specs} == {(-64, 63)}
    assert plan.scheme.label.startswith("W7A8")


def test_select_precision_without_target_is_a_clear_error(bert_graph):
    with pytest.raises(PassError) as info:
        PassManager([SelectPrecision()])(bert_graph, PassContext())
    assert info.value.exit_code == 2 and "needs a target" in str(info.value)


# ---- ORT files -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ['["a", "b/c"]', '{"nodes_to_exclude": ["a", "b/c"]}', "a\n\n  b/c  \n"])
def test_nodes_to_exclude_formats(tmp_path, text):
    path = tmp_path / "exclude.txt"
    path.write_text(text)
    assert PrecisionOverrides.read_nodes_to_exclude(path) == ("a", "b/c")


@pytest.mark.parametrize("text", ["[1, 2]", '{"nodes_to_exclude": "a"}'])
def test_nodes_to_exclude_rejects_non_name_lists(tmp_path, text):
    path = tmp_path / "exclude.json"
    path.write_text(text)
    with pytest.raises(OptionError, match="expected a JSON list of node names"):
        PrecisionOverrides.read_nodes_to_exclude(path)


def test_nodes_to_exclude_missing_file(tmp_path):
    with pytest.raises(OptionError, match="cannot read"):
        PrecisionOverrides.read_nodes_to_exclude(tmp_path / "nope.json")


def test_tensor_quant_overrides_parse(tmp_path):
    path = tmp_path / "overrides.json"
    path.write_text(json.dumps({"TensorQuantOverrides": {
        "b": [{"quant_type": "QInt16", "symmetric": True, "rmin": -2.5, "rmax": 4}],
        "a": [{"quant_type": "QUInt8", "scale": [0.125], "zero_point": [3]}],
        "c": {"symmetric": False}}}))
    parsed = PrecisionOverrides.read_tensor_overrides(path)
    assert parsed == (("a", TensorOverride(dtype="uint8", scale=0.125, zero_point=3)),
                      ("b", TensorOverride(dtype="int16", symmetric=True, rmin=-2.5, rmax=4.0)),
                      ("c", TensorOverride(symmetric=False)))
    assert isinstance(parsed[0][1].zero_point, int)
    overrides = PrecisionOverrides(tensors=parsed)
    assert overrides.tensor("b").dtype == "int16" and overrides.tensor("zzz") is None


@pytest.mark.parametrize("text,message", [
    ("{not json", "is not valid JSON"),
    ('[{"quant_type": "QInt8"}]', "expected an object mapping tensor names"),
    ('{"t": [{"quant_type": "QInt3"}]}', "unknown quant_type 'QInt3'"),
    ('{"t": ["QInt8"]}', "must be an object or a list of objects"),
    ('{"t": [{"scale": [0.1, 0.2], "zero_point": [0, 0]}]}', "per-channel"),
])
def test_tensor_quant_overrides_errors(tmp_path, text, message):
    path = tmp_path / "overrides.json"
    path.write_text(text)
    with pytest.raises(OptionError, match=message) as info:
        PrecisionOverrides.read_tensor_overrides(path)
    assert info.value.exit_code == 2
