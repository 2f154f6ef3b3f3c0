"""AWQ on the synthetic Llama (planted activation outlier channels): the folded scaling keeps
the float function, each fold kind is used where it applies, the clip search lowers the
rounding error, the weights emitted are the stored ones, and AWQ scaling + GPTQ rounding
compiles to MatMulNBits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeq.calibration.sources import open_source
from edgeq.quant.linears import linear_groups
from edgeq.quant.rounding import quantize_kn
from edgeq.ir import load
from edgeq.models import synthetic
from edgeq.models.llama import LlamaConfig
from edgeq.options import CompileOptions
from edgeq.pipeline import PassContext
from edgeq.passes.awq import AWQ
from edgeq.passes.insert_qdq import weight_key
from edgeq.registry import get_target
from edgeq.pipeline.artifacts import AWQ_CHOICES, CALIBRATION_DATA, QUANT_PLAN, WEIGHT_ROUNDING

from .helpers import assert_valid, ptq_pipeline, relative_l2, run

CONFIG = LlamaConfig(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=256)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("awq") / "llama.onnx"
    onnx.save(synthetic.llama(0, CONFIG), path)
    return path


@pytest.fixture(scope="module")
def feeds() -> list[dict]:
    return [synthetic.llama_feeds(1, 32, seed=i, config=CONFIG) for i in range(8)]


def _context(path, feeds) -> PassContext:
    ctx = PassContext(target=get_target("x86-vnni"))
    ctx.artifacts[CALIBRATION_DATA] = open_source(list(feeds), str(path))
    return ctx


def _planned(path, feeds, options: CompileOptions):
    graph = load(path)
    ctx = _context(path, feeds)
    graph = ptq_pipeline("x86-vnni", options, stop_after="select-precision")(graph, ctx).graph
    return graph, ctx


W4_G32 = CompileOptions(weights="int4", rotate=False, group=32, activations="float", weight_rounding="awq")


def test_scaling_keeps_the_float_function_and_uses_every_fold(llama_path, feeds):
    graph, ctx = _planned(llama_path, feeds, W4_G32)
    before = [run(graph, f, optimize=False)[0] for f in feeds[:3]]
    result = AWQ(round_weights=False)(graph, ctx)
    assert_valid(result.graph)
    stats = result.stats
    # q/k/v and gate/up (after RMSNorms) and the LM head (after the final norm) fold into the
    # norms' gamma; down_proj's input act(gate) * up folds into up_proj's columns; o_proj reads
    # the attention context through a Reshape: an explicit Mul.
    assert stats["groups"] == 9 and stats["scaled"] == 9
    assert (stats["folded"], stats["folded_gated"], stats["explicit_mul"]) == (5, 2, 2)
    assert WEIGHT_ROUNDING not in ctx.artifacts
    for f, reference in zip(feeds[:3], before):
        after = run(result.graph, f, optimize=False)[0]
        np.testing.assert_allclose(after, reference, rtol=1e-4, atol=1e-4 * float(np.abs(reference).max()))
    chosen = {r["alpha"] for r in ctx.artifacts[AWQ_CHOICES]}
    assert chosen - {0.0}  # the outlier channels make scaling worth it somewhere
    assert stats["mean_error_scaled"] < stats["mean_error_rtn"]


def test_no_explicit_mul_leaves_unfoldable_groups_alone(llama_path, feeds):
    graph, ctx = _planned(llama_path, feeds, W4_G32)
    muls = len(graph.ops_of_type("Mul"))
    stats = AWQ(round_weights=False, explicit_mul=False)(graph, ctx).stats
    assert stats["explicit_mul"] == 0 and stats["left_alone"] == 2  # the two o_proj groups
    assert (stats["folded"], stats["folded_gated"]) == (5, 2)
    assert len(graph.ops_of_type("Mul")) == muls


@pytest.mark.parametrize("group", [32, 128])
def test_clip_search_lowers_error_and_emitted_weights_are_the_stored_ones(llama_path, feeds, group):
    options = CompileOptions(weights="int4", rotate=False, group=group, activations="float", weight_rounding="awq")
    graph = load(llama_path)
    ctx = _context(llama_path, feeds)
    graph = ptq_pipeline("x86-vnni", options, stop_after="gptq")(graph, ctx).graph
    record = next(r for r in ctx.records if r.name == "awq")
    assert record.stats["layers"] == 15
    assert record.stats["mean_error_clipped"] < record.stats["mean_error_rtn"]
    assert next(r for r in ctx.records if r.name == "gptq").stats == {"layers": 0}  # awq rounds alone
    stored = dict(ctx.artifacts[WEIGHT_ROUNDING])
    plan = ctx.artifacts[QUANT_PLAN]
    groups, _ = linear_groups(graph, plan)
    clipped = 0
    for lin in (lin for g in groups for lin in g.linears):
        q, scale, zero = stored[weight_key(graph, lin.op, 1, lin.spec)]
        _, rtn_scale, _ = quantize_kn(lin.weight_kn(graph), lin.spec)
        assert np.all(scale <= rtn_scale * (1 + 1e-6)) and np.all(scale >= 0.5 * rtn_scale * (1 - 1e-6))
        clipped += int(np.sum(scale < rtn_scale * (1 - 1e-6)))
    assert clipped > 0

    graph = ptq_pipeline("x86-vnni", options, skip=_before("insert-qdq"))(graph, ctx).graph
    emitted = 0
    for dq in graph.ops_of_type("DequantizeLinear"):
        name = graph.inputs_of(dq)[0].name.removesuffix("_quantized")
        match = [arrays for key, arrays in stored.items() if key[0] == name]
        if match:
            emitted += 1
            for value, array in zip(graph.inputs_of(dq), match[0]):
                np.testing.assert_array_equal(graph.constant(value).numpy(), array)
    assert emitted == 15


def test_awq_then_gptq_compiles_to_matmulnbits_closer_to_float_than_rtn(llama_path, feeds):
    from edgeq.compiler import compile as compile_model

    errors = {}
    reference = [run(onnx.load(str(llama_path)), f)[0] for f in feeds[-2:]]
    for mode in ("rtn", "awq+gptq"):
        options = CompileOptions(weights="int4", rotate=False, group=32, activations="float", weight_rounding=mode)
        compiled = compile_model(llama_path, "x86-vnni", options, calibration=list(feeds[:-2]))
        assert compiled.report.fusion.integer_kernels.get("MatMulNBits") == 15
        assert compiled.report.fusion.all_fused
        errors[mode] = np.mean([relative_l2(r, run(compiled.graph, f)[0]) for r, f in zip(reference, feeds[-2:])])
        if mode == "awq+gptq":
            records = {r.name: r for r in compiled.report.passes}
            assert records["awq"].modified and "layers" not in records["awq"].stats
            assert records["gptq"].stats["layers"] == 15
    assert errors["awq+gptq"] < errors["rtn"]


def _before(name: str) -> tuple[str, ...]:
    """The pipeline's passes up to (not including) `name`."""
    pipeline = get_target("x86-vnni").default_pipeline
    return tuple(pipeline[:pipeline.index(name)])


def test_w4a8_activations_are_calibrated_on_the_scaled_graph(llama_path, feeds):
    """AWQ runs before calibration: the explicit Mul's output is what gets quantized for o_proj."""
    from edgeq.compiler import compile as compile_model

    options = CompileOptions(weights="int4", rotate=False, group=32, activations="int8", weight_rounding="awq")
    compiled = compile_model(llama_path, "x86-vnni", options, calibration=list(feeds))
    names = [r.name for r in compiled.report.passes]
    assert names.index("awq") < names.index("calibrate") < names.index("insert-qdq")
    graph = compiled.graph
    stats = next(r for r in compiled.report.passes if r.name == "awq").stats
    assert stats["explicit_mul"] >= 1
    # Each explicit Mul's output (insert_channel_mul names it <source>_smoothed) is quantized,
    # with a range calibrated after the scaling.
    quantized_sources = {graph.inputs_of(q)[0].name for q in graph.ops_of_type("QuantizeLinear")}
    assert sum(name.endswith("_smoothed") for name in quantized_sources) >= stats["explicit_mul"]
    assert compiled.report.verification.worst_relative_l2 < 0.5


def _gated_block(visible: dict[str, str]):
    """y = (h Wa * h Wb) Wd; `visible` makes names graph inputs ("input") or outputs ("output")."""
    from onnx import helper

    from .helpers import model, vi

    rng = np.random.default_rng(0)
    inits = {n: rng.standard_normal((8, 8)).astype(np.float32) for n in ("wa", "wb", "wd")}
    nodes = [helper.make_node("MatMul", ["h", "wa"], ["a"]), helper.make_node("MatMul", ["h", "wb"], ["b"]),
             helper.make_node("Mul", ["a", "b"], ["p"]), helper.make_node("MatMul", ["p", "wd"], ["y"])]
    shapes = {"wa": [8, 8], "wb": [8, 8], "a": [2, 8], "b": [2, 8]}
    inputs = [vi("h", [2, 8])] + [vi(n, shapes[n]) for n, w in visible.items() if w == "input"]
    outputs = [vi("y", [2, 8])] + [vi(n, shapes[n]) for n, w in visible.items() if w == "output"]
    graph = load(onnx.shape_inference.infer_shapes(model(nodes, inputs, outputs, inits)))  # a, b: [2, 8]
    return graph, {n: graph.value(n).const.numpy().copy() for n in ("wa", "wb")}


@pytest.mark.parametrize("visible, scaled", [
    ({}, "wb"),                                        # the second factor's linear first
    ({"wb": "input"}, "wa"), ({"wb": "output"}, "wa"), ({"b": "output"}, "wa"),
    ({"wa": "input", "wb": "input"}, None), ({"a": "output", "b": "output"}, None),
])
def test_the_gate_fold_scales_only_a_linear_private_to_the_match(visible, scaled):
    from edgeq.passes.awq import _fold_through_gate

    graph, before = _gated_block(visible)
    (down,) = [op for op in graph.ops_of_type("MatMul") if graph.inputs_of(op)[0].name == "p"]
    inv = np.linspace(0.5, 2.0, 8).astype(np.float32)
    assert _fold_through_gate(graph, graph.value("p"), [down], inv) == (scaled is not None)
    for name, old in before.items():
        new = graph.value(name).const.numpy()
        assert np.allclose(new, old * inv[None, :]) if name == scaled else np.array_equal(new, old)
