"""smooth-quant: the float model computes the same function after smoothing (checked in ORT
before any quantization), 1/s folds into LayerNormalization gamma/beta or RMSNorm's gamma
where that is exact and the constants are private, and becomes an explicit Mul otherwise."""

from __future__ import annotations


import numpy as np
import onnx
import pytest
from onnx import helper

import edgeq
from edgeq.ir import Graph
from edgeq.options import CompileOptions
from edgeq.pipeline import PassManager, VerifyInstrument
from edgeq.passes.select_precision import SelectPrecision
from edgeq.passes.smooth_quant import SmoothQuant
from edgeq.registry import get_pass
from tests.passes.helpers import PREPROCESS, assert_valid, model, ptq_context, relative_l2, run, vi

node = helper.make_node
TOLERANCE = 1e-4  # relative; measured 8e-8 (BERT), 5e-7 (Llama)


def _smooth(graph: Graph, path, feeds, alpha: float = 0.5):
    """Preprocess, plan, smooth: the pipeline up to (not including) quantization."""
    ctx = ptq_context("x86-vnni", path, feeds)
    ctx.instruments.append(VerifyInstrument())
    passes = [get_pass(n)() for n in PREPROCESS] + [SelectPrecision(CompileOptions()), SmoothQuant(alpha)]
    PassManager(passes)(graph, ctx)
    assert_valid(graph)
    return next(r for r in ctx.records if r.name == "smooth-quant").stats


def _assert_same_function(reference: onnx.ModelProto, graph: Graph, feeds) -> None:
    for feed in feeds:
        for expected, actual in zip(run(reference, feed, optimize=False), run(graph, feed, optimize=False)):
            assert relative_l2(expected, actual) < TOLERANCE
            assert np.abs(expected - actual).max() <= TOLERANCE * np.abs(expected).max()


def _smoothing_muls(graph: Graph) -> list:
    return [op for op in graph.ops_of_type("Mul") if graph.outputs_of(op)[0].name.endswith("_smoothed")]


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_smoothing_keeps_the_float_model_output(which, synthetic_bert, synthetic_llama, bert_feeds, llama_feeds):
    path, feeds = (synthetic_bert, bert_feeds) if which == "bert" else (synthetic_llama, llama_feeds)
    graph = edgeq.load(path)
    stats = _smooth(graph, path, feeds[:4])
    assert stats["groups"] == (8 if which == "bert" else 9)
    assert stats["folded"] + stats["explicit_mul"] == stats["groups"]
    assert len(_smoothing_muls(graph)) == stats["explicit_mul"]
    _assert_same_function(onnx.load(str(path)), graph, feeds[4:])  # samples it was not calibrated on


def test_llama_folds_into_every_rms_norm_gamma(synthetic_llama, llama_feeds):
    graph = edgeq.load(synthetic_llama)
    before = {v.name: v.const.numpy().copy() for v in graph.initializers if v.name.endswith("norm.weight")}
    assert len(before) == 5
    stats = _smooth(graph, synthetic_llama, llama_feeds[:4])
    # Each RMSNorm output feeds only linears (pre-norm): q/k/v, gate/up, lm_head.
    assert stats["folded"] == 5 and stats["explicit_mul"] == 4
    for name, old in before.items():
        assert not np.allclose(graph.value(name).const.numpy(), old), f"{name} was not rescaled"
    # o_proj (reads merged heads) and down_proj (reads SiLU(gate) * up) get explicit Muls.
    readers = {reader.name for mul in _smoothing_muls(graph) for reader in graph.consumers(graph.outputs_of(mul)[0])}
    assert readers == {f"/model/layers.{i}/{p}/MatMul" for i in (0, 1) for p in ("self_attn/o_proj", "mlp/down_proj")}


def _pre_norm_block(*, residual_reads_norm: bool = False, shared_gamma: bool = False) -> onnx.ModelProto:
    """x -> LayerNorm -> {MatMul Wa, MatMul Wb} -> Add -> y, with outlier input channels.
    residual_reads_norm: y also adds the norm's output (its output has a non-linear reader).
    shared_gamma: a second LayerNorm on x reads the same gamma."""
    rng = np.random.default_rng(0)
    gamma = (1 + 0.1 * rng.standard_normal(16)).astype(np.float32)
    gamma[[2, 9]] *= 60  # activation outlier channels
    inits = {"gamma": gamma, "beta": (0.1 * rng.standard_normal(16)).astype(np.float32),
             "wa": (0.05 * rng.standard_normal((16, 16))).astype(np.float32),
             "wb": (0.05 * rng.standard_normal((16, 16))).astype(np.float32)}
    nodes = [node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, epsilon=1e-5),
             node("MatMul", ["h", "wa"], ["a"]), node("MatMul", ["h", "wb"], ["b"]), node("Add", ["a", "b"], ["s"])]
    last = "s"
    if residual_reads_norm:
        nodes.append(node("Add", ["s", "h"], ["r"]))
        last = "r"
    if shared_gamma:
        inits["beta2"] = np.zeros(16, np.float32)
        nodes += [node("LayerNormalization", ["x", "gamma", "beta2"], ["h2"], axis=-1, epsilon=1e-5),
                  node("Add", [last, "h2"], ["r2"])]
        last = "r2"
    nodes.append(node("Relu", [last], ["y"]))
    return model(nodes, [vi("x", [1, 8, 16])], [vi("y", [1, 8, 16])], inits)


def _block_feeds(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 8, 16)).astype(np.float32)} for _ in range(n)]


def test_folds_into_layer_norm_gamma_and_beta_when_it_is_exact_and_private(tmp_path):
    source = _pre_norm_block()
    path = tmp_path / "block.onnx"
    onnx.save(source, str(path))
    graph = edgeq.load(path)
    old = {n: graph.value(n).const.numpy().copy() for n in ("gamma", "beta", "wa", "wb")}
    stats = _smooth(graph, path, _block_feeds(4))
    assert stats == {"groups": 1, "folded": 1, "explicit_mul": 0, "left_alone": 0}
    assert _smoothing_muls(graph) == [] and len(graph.ops_of_type("Mul")) == 0
    new = {n: graph.value(n).const.numpy() for n in old}
    inv = new["gamma"] / old["gamma"]                      # 1/s per channel
    assert np.allclose(new["beta"], old["beta"] * inv, rtol=1e-6)
    for w in ("wa", "wb"):                                 # W' = diag(s) W
        assert np.allclose(new[w], old[w] / inv[:, None], rtol=1e-5)
    assert inv[[2, 9]].max() < inv[np.r_[0:2, 3:9, 10:16]].min()  # outlier channels shrink most
    _assert_same_function(source, graph, _block_feeds(2, seed=1))


@pytest.mark.parametrize("variant", ["residual_reads_norm", "shared_gamma"])
def test_explicit_mul_when_folding_would_change_other_readers(tmp_path, variant):
    source = _pre_norm_block(**{variant: True})
    path = tmp_path / "block.onnx"
    onnx.save(source, str(path))
    graph = edgeq.load(path)
    old_gamma, old_beta = graph.value("gamma").const.numpy().copy(), graph.value("beta").const.numpy().copy()
    stats = _smooth(graph, path, _block_feeds(4))
    assert stats["folded"] == 0 and stats["explicit_mul"] == 1
    assert np.array_equal(graph.value("gamma").const.numpy(), old_gamma)  # untouched
    assert np.array_equal(graph.value("beta").const.numpy(), old_beta)
    (mul,) = _smoothing_muls(graph)
    assert {r.op_type for r in graph.consumers(graph.outputs_of(mul)[0])} == {"MatMul"}
    assert len(graph.consumers(graph.outputs_of(mul)[0])) == 2
    _assert_same_function(source, graph, _block_feeds(2, seed=1))


def test_alpha_none_disables_the_pass(synthetic_llama, llama_feeds):
    graph = edgeq.load(synthetic_llama)
    stats = _smooth(graph, synthetic_llama, llama_feeds[:2], alpha=None)
    assert stats == {"groups": 0}
    assert _smoothing_muls(graph) == []


def test_the_search_is_the_default_except_after_a_rotation():
    from edgeq.options import SMOOTH_SEARCH_GRID, CompileOptions
    from edgeq.passes.smooth_quant import SmoothQuant
    from edgeq.registry import get_target

    x86 = get_target("x86-vnni")

    def grid(**options):
        return SmoothQuant.from_options(CompileOptions(**options), x86).alpha_grid

    assert grid() == SMOOTH_SEARCH_GRID                       # W8A8: rotation only on pre-norm decoders,
    assert not SmoothQuant.from_options(CompileOptions(), x86).after_rotation  # so decided at run time
    assert grid(rotate=True) == ()                            # the rotation pass smooths itself
    assert grid(weights="int4", activations="int8") == ()     # x86 rotates int4 presets
    assert grid(weights="int4", rotate=False) == SMOOTH_SEARCH_GRID
    assert grid(rotate=True, smooth_alpha_grid=(0.0, 0.5)) == (0.0, 0.5)  # asked for: searched
    assert grid(smooth_alpha=0.5) == () and SmoothQuant.from_options(CompileOptions(smooth_alpha=0.5), x86).alpha == 0.5


def _visible(source: onnx.ModelProto, name: str, where: str) -> onnx.ModelProto:
    """`source` with initializer `name` also a graph input (overridable) or a graph output."""
    array = next(onnx.numpy_helper.to_array(t) for t in source.graph.initializer if t.name == name)
    getattr(source.graph, where).append(vi(name, list(array.shape)))
    return source


@pytest.mark.parametrize("where", ["input", "output"])
def test_a_norm_constant_the_caller_sees_is_not_folded_into(tmp_path, where):
    source = _visible(_pre_norm_block(), "gamma", where)
    path = tmp_path / "block.onnx"
    onnx.save(source, str(path))
    graph = edgeq.load(path)
    old_gamma = graph.value("gamma").const.numpy().copy()
    stats = _smooth(graph, path, _block_feeds(4))
    assert stats["folded"] == 0 and stats["explicit_mul"] == 1
    assert np.array_equal(graph.value("gamma").const.numpy(), old_gamma)
    _assert_same_function(source, graph, _block_feeds(2, seed=1))


@pytest.mark.parametrize("where", ["input", "output"])
def test_a_weight_the_caller_sees_leaves_its_group_alone(tmp_path, where):
    source = _visible(_pre_norm_block(), "wa", where)
    path = tmp_path / "block.onnx"
    onnx.save(source, str(path))
    graph = edgeq.load(path)
    old = {n: graph.value(n).const.numpy().copy() for n in ("gamma", "beta", "wa", "wb")}
    stats = _smooth(graph, path, _block_feeds(4))
    assert stats == {"groups": 0}
    assert all(np.array_equal(graph.value(n).const.numpy(), a) for n, a in old.items())
    assert _smoothing_muls(graph) == []


def test_a_weight_shared_by_two_linears_leaves_its_group_alone(tmp_path):
    source = _pre_norm_block()
    for n in source.graph.node:   # both linears read wa
        n.input[:] = ["h", "wa"] if list(n.input) == ["h", "wb"] else list(n.input)
    del source.graph.initializer[[t.name for t in source.graph.initializer].index("wb")]
    path = tmp_path / "block.onnx"
    onnx.save(source, str(path))
    graph = edgeq.load(path)
    old = {n: graph.value(n).const.numpy().copy() for n in ("gamma", "beta", "wa")}
    stats = _smooth(graph, path, _block_feeds(4))
    assert stats == {"groups": 0}
    assert all(np.array_equal(graph.value(n).const.numpy(), a) for n, a in old.items())
