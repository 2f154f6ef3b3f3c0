"""hadamard-rotation: before any quantization the rotated model is the same function (ORT,
1e-4 relative) on the synthetic Llama (stream rotation, with and without KV cache) and BERT
(post-norm: online rotations); the weights change as the algebra says; graphs it cannot rotate
are refused with a RotationError; and a compiled W8A8 model loses less with it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import edgeq
from edgeq.quant.hadamard import Rotation
from edgeq.ir import Graph, to_model_proto
from edgeq.models import synthetic
from edgeq.models.llama import LlamaConfig
from edgeq.options import CalibrationOptions, CompileOptions
from edgeq.pipeline import PassContext, PassManager, VerifyInstrument
from edgeq.passes.hadamard_rotation import HadamardRotation, RotationError
from edgeq.registry import get_pass, get_target
from edgeq.pipeline.artifacts import CALIBRATION_DATA, ROTATION
from tests.passes.helpers import PREPROCESS, assert_valid, model, relative_l2, run, vi

node = helper.make_node
TOLERANCE = 1e-4   # relative; measured 2e-6 (Llama), 4e-8 (BERT)
SEED = 3


def _rotate(path_or_model, rotation: HadamardRotation | None = None) -> tuple[Graph, PassContext]:
    if isinstance(path_or_model, onnx.ModelProto):
        graph = _load_proto(path_or_model)
    else:
        graph = edgeq.load(path_or_model)
    ctx = PassContext(seed=SEED, instruments=[VerifyInstrument()])
    PassManager([get_pass(n)() for n in PREPROCESS] + [rotation or HadamardRotation()])(graph, ctx)
    return graph, ctx


def _load_proto(proto: onnx.ModelProto) -> Graph:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(proto, str(path))
        graph = edgeq.load(path)
        # materialise the lazily read weights before the file goes away
        for value in graph.initializers:
            graph.set_const(value, np.array(value.const.numpy()))
        return graph


def _stats(ctx: PassContext) -> dict:
    return dict(next(r for r in ctx.records if r.name == "hadamard-rotation").stats)


def _assert_same_function(reference: onnx.ModelProto, graph: Graph, feeds) -> None:
    for feed in feeds:
        expected_all = run(reference, feed, optimize=False)
        actual_all = run(graph, feed, optimize=False)
        assert len(expected_all) == len(actual_all)
        for expected, actual in zip(expected_all, actual_all):
            if expected.size == 0:
                continue
            assert relative_l2(expected, actual) < TOLERANCE
            assert np.abs(expected - actual).max() <= TOLERANCE * np.abs(expected).max()


def _weights(graph: Graph) -> dict[str, np.ndarray]:
    return {v.name: np.array(v.const.numpy(), dtype=np.float64) for v in graph.initializers}


# ---- float equivalence ------------------------------------------------------------------------


@pytest.mark.parametrize("which, mode, online_op", [
    ("llama", "auto", "Einsum"), ("llama", "online", "Einsum"), ("llama-kv", "auto", "Einsum"),
    ("bert", "auto", "Einsum"), ("bert", "online", "Einsum"),
    # the NPU form: every online product a MatMul by a constant (H^T on the left for k^T)
    ("llama", "auto", "MatMul"), ("llama-kv", "auto", "MatMul"), ("bert", "online", "MatMul")])
def test_rotated_float_model_computes_the_same_function(which, mode, online_op, synthetic_llama, synthetic_bert,
                                                         llama_feeds, bert_feeds, tmp_path):
    if which == "bert":
        path, feeds = synthetic_bert, bert_feeds
    elif which == "llama":
        path, feeds = synthetic_llama, llama_feeds
    else:
        path = synthetic.build_llama_file(tmp_path / "llama_kv.onnx", kv_cache=True)
        feeds = [synthetic.llama_feeds(seq=12, seed=i, kv_cache=True) for i in range(3)]
        past = _run_prefix(path)   # a second step with a non-empty cache
        feeds.append({"input_ids": feeds[0]["input_ids"][:, :5],
                      "attention_mask": np.ones((1, 17), np.int64), **past})
    graph, ctx = _rotate(path, HadamardRotation(mode=mode, online_op=online_op))
    assert_valid(graph)    # IR invariants, onnx full check, ORT load
    kinds = {op.op_type for op in graph.ops()}
    assert ("Einsum" in kinds) == (online_op == "Einsum")
    stats = _stats(ctx)
    assert stats["stream"] == (mode == "auto" and which != "bert")
    _assert_same_function(onnx.load(str(path)), graph, feeds)
    # and with ORT's graph optimisations (fusions) on
    for expected, actual in zip(run(onnx.load(str(path)), feeds[0]), run(graph, feeds[0])):
        assert relative_l2(expected, actual) < TOLERANCE


def _run_prefix(path) -> dict[str, np.ndarray]:
    feeds = synthetic.llama_feeds(seq=12, seed=9, kv_cache=True)
    model = onnx.load(str(path))
    names = [o.name for o in model.graph.output]
    outputs = dict(zip(names, run(model, feeds)))
    return {name.replace("present", "past_key_values"): value for name, value in outputs.items()
            if name.startswith("present")}


# ---- what changes -------------------------------------------------------------------------------


def test_llama_stream_rotation_changes_the_weights_as_the_algebra_says(synthetic_llama):
    before_graph = edgeq.load(synthetic_llama)
    before = _weights(before_graph)
    graph, ctx = _rotate(synthetic_llama)
    after = _weights(graph)
    stats = _stats(ctx)
    assert stats == {"rotated": 1, "stream": 1, "hidden": 64, "norms_fused": 5, "embeddings": 1, "writers": 4,
                     "online_hadamards": 4, "attention_folds": 2, "qk_rotations": 2, "smoothed": 0,
                     "weights_changed": 16, "skipped": 0}
    q = Rotation.of_order(64, seed=SEED).dense()
    np.testing.assert_allclose(q @ q.T, np.eye(64), atol=1e-12)
    config = synthetic.TINY_LLAMA
    per_head = np.kron(np.eye(config.hidden_size // config.head_dim), Rotation.of_order(config.head_dim).dense())
    per_kv_head = np.kron(np.eye(config.num_kv_heads), Rotation.of_order(config.head_dim).dense())
    ffn = Rotation.of_order(config.intermediate_size).last_axis_form().dense()   # online: permuted output
    full = Rotation.of_order(config.hidden_size).dense()

    def close(name, expected):
        np.testing.assert_allclose(after[name], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())

    close("model.embed_tokens.weight", before["model.embed_tokens.weight"] @ q)            # E Q
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        g_in = before[f"{p}.input_layernorm.weight"][:, None]
        g_post = before[f"{p}.post_attention_layernorm.weight"][:, None]
        close(f"{p}.self_attn.q_proj.weight", q.T @ (g_in * before[f"{p}.self_attn.q_proj.weight"]))
        close(f"{p}.self_attn.k_proj.weight", q.T @ (g_in * before[f"{p}.self_attn.k_proj.weight"]))
        close(f"{p}.self_attn.v_proj.weight", q.T @ (g_in * before[f"{p}.self_attn.v_proj.weight"]) @ per_kv_head)
        # per-head fold, then the online full-width Hadamard before o_proj, then the stream
        close(f"{p}.self_attn.o_proj.weight", full.T @ per_head.T @ before[f"{p}.self_attn.o_proj.weight"] @ q)
        close(f"{p}.mlp.gate_proj.weight", q.T @ (g_post * before[f"{p}.mlp.gate_proj.weight"]))
        close(f"{p}.mlp.up_proj.weight", q.T @ (g_post * before[f"{p}.mlp.up_proj.weight"]))
        close(f"{p}.mlp.down_proj.weight", ffn.T @ before[f"{p}.mlp.down_proj.weight"] @ q)
    close("lm_head.weight", q.T @ (before["model.norm.weight"][:, None] * before["lm_head.weight"]))
    # The gains are gone from the graph (folded). Online Hadamards per layer: the MLP's
    # (192 = 12 (x) 16: two Einsums), o_proj's (64: one), q's and k's (one each).
    assert not any(name.endswith("norm.weight") for name in after)
    einsums = graph.ops_of_type("Einsum")
    assert len(einsums) == 2 * (2 + 1 + 2)
    downs = [op for op in graph.ops_of_type("MatMul") if graph.inputs_of(op)[1].name.endswith("down_proj.weight")]
    for down in downs:
        reshape = graph.producer(graph.inputs_of(down)[0])
        assert reshape.op_type == "Reshape" and graph.producer(graph.inputs_of(reshape)[0]).op_type == "Einsum"


def test_rotation_spreads_the_planted_activation_outliers(synthetic_llama, llama_feeds):
    """The q/k/v input had planted outlier channels 50-100x the rest; rotated, its peak-to-RMS
    ratio (what per-tensor int8 pays for) falls to that of Gaussian noise (measured 10.5 -> 3.0)."""
    def peak_to_rms(graph: Graph) -> float:
        first_q = next(op for op in graph.ops_of_type("MatMul")
                       if graph.inputs_of(op)[1].name == "model.layers.0.self_attn.q_proj.weight")
        name = graph.inputs_of(first_q)[0].name
        proto = to_model_proto(graph)
        proto.graph.output.add().name = name
        (x,) = run(proto, llama_feeds[0])[-1:]
        return float(np.abs(x).max() / np.sqrt(np.mean(x.astype(np.float64) ** 2)))

    before = peak_to_rms(edgeq.load(synthetic_llama))
    graph, _ = _rotate(synthetic_llama)
    after = peak_to_rms(graph)
    assert before > 8 and after < 4, (before, after)


def test_bert_post_norm_gets_online_rotations_and_keeps_its_layer_norms(synthetic_bert):
    before = _weights(edgeq.load(synthetic_bert))
    graph, ctx = _rotate(synthetic_bert)
    after = _weights(graph)
    stats = _stats(ctx)
    # per layer: online before q/k/v, intermediate, output.dense and attention.output.dense
    assert stats["stream"] == 0 and stats["online_hadamards"] == 8 and stats["attention_folds"] == 2
    assert stats["qk_rotations"] == 2
    summary = ctx.artifacts[ROTATION]
    assert any("LayerNorm" in note and "post-norm" in note for note in summary.notes)
    # LayerNorm gamma/beta are untouched: its centring and gain stay exact where they are.
    for name, value in before.items():
        if "LayerNorm" in name or "embeddings" in name:
            np.testing.assert_array_equal(after[name], value)
    h = Rotation.of_order(64).dense()
    h_ffn = Rotation.of_order(256).last_axis_form().dense()
    head = np.kron(np.eye(4), Rotation.of_order(16).dense())
    for i in range(2):
        p = f"encoder.layer.{i}"
        for name in ("attention.self.query", "attention.self.key", "intermediate.dense"):
            np.testing.assert_allclose(after[f"{p}.{name}.weight"], h.T @ before[f"{p}.{name}.weight"], atol=1e-6)
            np.testing.assert_array_equal(after[f"{p}.{name}.bias"], before[f"{p}.{name}.bias"])
        np.testing.assert_allclose(after[f"{p}.attention.self.value.weight"],
                                   h.T @ before[f"{p}.attention.self.value.weight"] @ head, atol=1e-6)
        np.testing.assert_allclose(after[f"{p}.attention.self.value.bias"],
                                   before[f"{p}.attention.self.value.bias"] @ head, atol=1e-6)
        np.testing.assert_allclose(after[f"{p}.attention.output.dense.weight"],
                                   h.T @ head.T @ before[f"{p}.attention.output.dense.weight"], atol=1e-6)
        np.testing.assert_allclose(after[f"{p}.output.dense.weight"], h_ffn.T @ before[f"{p}.output.dense.weight"],
                                   atol=1e-6)
    assert len(graph.ops_of_type("LayerNormalization")) == 5


def _pre_norm_layer_norm_model(d: int = 24, ffn: int = 32, vocab: int = 40) -> onnx.ModelProto:
    """A GPT-2-shaped pre-norm decoder with fused LayerNormalization (gamma with outlier
    channels, beta), readers with and without bias, writers with and without bias, and an LM
    head whose output is the graph output. d = 24 = 12 (x) 2 exercises a Paley factor."""
    rng = np.random.default_rng(0)

    def w(*shape, scale=0.2):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    inits = {"E": w(vocab, d, scale=1.0), "W1": w(d, ffn), "c1": w(ffn), "W2": w(ffn, d), "c2": w(d),
             "W3": w(d, ffn), "W4": w(ffn, d), "Wh": w(d, vocab)}
    for i in (1, 2, 3):
        gain = 1 + 0.1 * rng.standard_normal(d)
        gain[[3, 17]] *= 30
        inits[f"g{i}"], inits[f"b{i}"] = gain.astype(np.float32), w(d, scale=0.5)
    nodes = [node("Gather", ["E", "ids"], ["x0"]),
             node("LayerNormalization", ["x0", "g1", "b1"], ["n1"], axis=-1, epsilon=1e-5),
             node("MatMul", ["n1", "W1"], ["m1"]), node("Add", ["m1", "c1"], ["h1"]), node("Relu", ["h1"], ["r1"]),
             node("MatMul", ["r1", "W2"], ["m2"]), node("Add", ["c2", "m2"], ["y1"]), node("Add", ["x0", "y1"], ["x1"]),
             node("LayerNormalization", ["x1", "g2", "b2"], ["n2"], axis=-1, epsilon=1e-5),
             node("MatMul", ["n2", "W3"], ["m3"]), node("Relu", ["m3"], ["r3"]), node("MatMul", ["r3", "W4"], ["y3"]),
             node("Add", ["y3", "x1"], ["x2"]),
             node("LayerNormalization", ["x2", "g3", "b3"], ["n3"], axis=-1, epsilon=1e-5),
             node("MatMul", ["n3", "Wh"], ["logits"])]
    return model(nodes, [vi("ids", ["batch", "seq"], onnx.TensorProto.INT64)],
                 [vi("logits", ["batch", "seq", vocab])], inits)


def test_pre_norm_layer_norm_stream_handles_centring_gain_and_bias():
    """LayerNorm's mean-centring: with Q's first column constant, centring in the rotated basis
    is zeroing channel 0, so LayerNorm(x) Q = RMSNorm(x Q * [0, 1, ..., 1]); gamma and beta
    (as a bias beta W) go into the readers."""
    proto = _pre_norm_layer_norm_model()
    graph, ctx = _rotate(proto)
    assert_valid(graph)
    stats = _stats(ctx)
    assert stats["stream"] == 1 and stats["norms_fused"] == 3 and stats["online_hadamards"] == 2
    assert not graph.ops_of_type("LayerNormalization")
    assert [v.name for v in graph.outputs] == ["logits"]
    feeds = [{"ids": np.random.default_rng(i).integers(0, 40, size=(2, 7)).astype(np.int64)} for i in range(3)]
    _assert_same_function(proto, graph, feeds)
    q = Rotation(Rotation.of_order(24).factors, signs=None).dense()
    first = np.sign(q[:, 0])
    rotated_embedding = graph.value("E").const.numpy()
    q_used = first[:, None] * q
    np.testing.assert_allclose(q_used[:, 0], 1 / np.sqrt(24), atol=1e-12)
    np.testing.assert_allclose(rotated_embedding, onnx.numpy_helper.to_array(
        next(t for t in proto.graph.initializer if t.name == "E")) @ q_used, atol=1e-5)


@pytest.mark.parametrize("which", ["llama", "bert"])
def test_smoothing_before_the_online_hadamards_keeps_the_function(which, synthetic_llama, synthetic_bert,
                                                                   llama_feeds, bert_feeds):
    """SmoothRot: with calibration data, an online group's input is divided per channel by s
    (alpha searched per group) before its Hadamard: folded into SwiGLU's up projection in the
    Llama, an explicit float Mul after BERT's GELU / LayerNorms."""
    from edgeq.calibration.sources import open_source

    path, feeds = (synthetic_llama, llama_feeds) if which == "llama" else (synthetic_bert, bert_feeds)
    graph = edgeq.load(path)
    ctx = PassContext(seed=SEED, instruments=[VerifyInstrument()])
    ctx.artifacts[CALIBRATION_DATA] = open_source(feeds[:4], str(path))
    PassManager([get_pass(n)() for n in PREPROCESS] + [HadamardRotation()])(graph, ctx)
    assert_valid(graph)
    summary = ctx.artifacts[ROTATION]
    smoothed = [name for name, alpha in summary.smoothing if alpha]
    assert smoothed and _stats(ctx)["smoothed"] == len(smoothed)
    # never on an attention context (its input is rotated per head already); names only checked
    assert not any("self_attn/" in name or "attention/self/" in name for name, _ in summary.smoothing)
    explicit = [v for v in graph.values() if v.name.endswith("_smoothed")]
    if which == "llama":
        assert not explicit   # 1/s went into up_proj's columns
    else:
        assert len(explicit) == len(smoothed)
    _assert_same_function(onnx.load(str(path)), graph, feeds[4:])


def test_no_smoothing_without_calibration_data(synthetic_llama):
    graph, ctx = _rotate(synthetic_llama)
    summary = ctx.artifacts[ROTATION]
    assert _stats(ctx)["smoothed"] == 0 and any("no calibration data" in n for n in summary.notes)


# ---- refusals -----------------------------------------------------------------------------------


def test_stream_mode_refuses_a_post_norm_encoder(synthetic_bert):
    graph = edgeq.load(synthetic_bert)
    with pytest.raises(Exception) as info:
        PassManager([get_pass(n)() for n in PREPROCESS] + [HadamardRotation(mode="stream")])(graph, PassContext())
    assert isinstance(info.value.__cause__, RotationError)
    assert "post-norm" in str(info.value) and info.value.exit_code == 2


def test_stream_mode_refuses_a_hidden_size_without_hadamard_matrix(tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=92, num_layers=1, num_heads=2, num_kv_heads=2,
                         intermediate_size=128)
    proto = synthetic.llama(0, config)
    with pytest.raises(Exception) as info:
        _rotate(proto, HadamardRotation(mode="stream"))
    assert isinstance(info.value.__cause__, RotationError) and "order 92" in str(info.value)
    # auto: the stream is left alone, the MLP input (128 wide) still rotates online, exactly
    graph, ctx = _rotate(proto)
    summary = ctx.artifacts[ROTATION]
    assert summary.mode == "online" and summary.online and any("order 92" in why for _, why in summary.skipped)
    _assert_same_function(proto, graph, [synthetic.llama_feeds(seq=8, seed=1, config=config)])


def test_refuses_a_graph_without_linear_layers():
    m = model([node("Relu", ["x"], ["h"]), node("Add", ["h", "x"], ["y"])], [vi("x", [2, 64])], [vi("y", [2, 64])])
    graph = _load_proto(m)
    with pytest.raises(RotationError, match="nothing to rotate"):
        HadamardRotation()(graph, PassContext())


def test_refuses_to_fold_into_a_shared_embedding_table():
    """Tied embedding: the table is read by the Gather and (transposed) by the LM head; folding
    E -> E Q would change the head, so the stream is refused (the online form is used)."""
    rng = np.random.default_rng(0)
    d, vocab = 16, 32
    inits = {"E": rng.standard_normal((vocab, d)).astype(np.float32),
             "gamma": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
             "W": (0.1 * rng.standard_normal((d, d))).astype(np.float32),
             "two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32), "axes": np.array([-1])}
    nodes = [node("Gather", ["E", "ids"], ["x0"]),
             *_rms("x0", "n0", "a"), node("MatMul", ["n0", "W"], ["w0"]), node("Add", ["x0", "w0"], ["x1"]),
             *_rms("x1", "n1", "b"), node("Transpose", ["E"], ["ET"], perm=[1, 0]),
             node("MatMul", ["n1", "ET"], ["logits"])]
    inits["gamma_b"] = inits["gamma"].copy()
    m = model(nodes, [vi("ids", [1, 5], onnx.TensorProto.INT64)], [vi("logits", [1, 5, vocab])], inits, opset=18)
    graph = _load_proto(m)
    with pytest.raises(RotationError, match="tied"):
        HadamardRotation(mode="stream")(graph, PassContext())
    graph = _load_proto(m)
    result = HadamardRotation()(graph, PassContext())
    assert result.stats["stream"] == 0
    _assert_same_function(m, graph, [{"ids": np.array([[1, 5, 7, 30, 2]], np.int64)}])


def _token_and_position_embeddings(visible: str | None = None, where: str = "input") -> onnx.ModelProto:
    """The pre-norm LayerNorm decoder with x0 = E[ids] + P[positions], and `visible` (a table or
    an embedding part) also a graph input or output."""
    proto = _pre_norm_layer_norm_model()
    d = 24
    gather = next(n for n in proto.graph.node if n.op_type == "Gather")
    gather.output[0] = "tok"
    at = list(proto.graph.node).index(gather) + 1
    proto.graph.node.insert(at, node("Gather", ["P", "positions"], ["pos"]))
    proto.graph.node.insert(at + 1, node("Add", ["tok", "pos"], ["x0"]))
    p = 0.5 * np.random.default_rng(1).standard_normal((16, d)).astype(np.float32)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(p, "P"))
    proto.graph.input.append(vi("positions", ["batch", "seq"], onnx.TensorProto.INT64))
    if visible is not None:
        shapes = {"E": [40, d], "P": [16, d], "tok": ["batch", "seq", d]}
        getattr(proto.graph, where).append(vi(visible, shapes[visible]))
    onnx.checker.check_model(proto, full_check=True)
    return proto


@pytest.mark.parametrize("visible, where, why", [
    (None, "", None),                          # both tables private: the stream folds into them
    ("P", "input", "read elsewhere too"),      # an overridable initializer: the caller may replace it
    ("tok", "output", "embedding part 'tok' is read elsewhere too"),
])
def test_refuses_to_fold_into_an_embedding_the_caller_sees(visible, where, why):
    proto = _token_and_position_embeddings(visible, where)
    rng = np.random.default_rng(2)
    feeds = [{"ids": rng.integers(0, 40, size=(2, 7)).astype(np.int64),
              "positions": np.tile(np.arange(7, dtype=np.int64), (2, 1))}]
    if why is not None:
        with pytest.raises(RotationError, match=why):
            HadamardRotation(mode="stream")(_load_proto(proto), PassContext())
    graph = _load_proto(proto)
    result = HadamardRotation()(graph, PassContext())
    assert result.stats["stream"] == int(why is None) and result.stats["embeddings"] == (2 if why is None else 0)
    _assert_same_function(proto, graph, feeds)   # the visible part included


def _rms(x: str, out: str, tag: str) -> list:
    gamma = "gamma" if tag == "a" else "gamma_b"
    return [node("Pow", [x, "two"], [f"{tag}_sq"]), node("ReduceMean", [f"{tag}_sq", "axes"], [f"{tag}_ms"]),
            node("Add", [f"{tag}_ms", "eps"], [f"{tag}_v"]), node("Sqrt", [f"{tag}_v"], [f"{tag}_s"]),
            node("Reciprocal", [f"{tag}_s"], [f"{tag}_r"]), node("Mul", [x, f"{tag}_r"], [f"{tag}_n"]),
            node("Mul", [gamma, f"{tag}_n"], [out])]


# ---- options, pipeline, compile -----------------------------------------------------------------


def test_option_pipeline_and_disabled_pass(synthetic_llama):
    assert not HadamardRotation.from_options(CompileOptions(), None).enabled
    assert HadamardRotation.from_options(CompileOptions(rotate=True), None).enabled
    # the smoothing search simulates the quantization the target and options ask for
    w4 = HadamardRotation.from_options(CompileOptions(rotate=True, weights="int4", group=64), get_target("x86-vnni"))
    assert w4.weight_spec.dtype == "int4" and w4.weight_spec.block_size == 64
    assert w4.activation_spec.dtype == "uint8" and not w4.activation_spec.symmetric
    weight_only = HadamardRotation.from_options(CompileOptions(rotate=True, activations="float"),
                                                get_target("x86-vnni"))
    assert weight_only.enabled and weight_only.smooth_grid == ()
    for name in ("x86-vnni", "x86-avx2", "x86-amx"):
        pipeline = get_target(name).default_pipeline
        assert pipeline.index("hadamard-rotation") < pipeline.index("select-precision")
    graph = edgeq.load(synthetic_llama)
    result = HadamardRotation(enabled=False)(graph, PassContext())
    assert not result.modified


def test_compiled_w8a8_llama_loses_less_with_rotation(synthetic_llama):
    """End to end through edgeq.compile: per-tensor int8 activations; the online Hadamards
    stay float (no Q/DQ on them)."""
    from edgeq.compiler import compile as compile_model

    feeds = [synthetic.llama_feeds(seq=16, seed=i) for i in range(8)]
    errors = {}
    for rotate in (False, True):
        options = CompileOptions(activations="int8", rotate=rotate, threads=1, smooth_alpha=None,
                                 smooth_alpha_grid=(), calibration=CalibrationOptions(method="minmax", holdout=3))
        compiled = compile_model(synthetic_llama, "x86-vnni", options, calibration=feeds)
        errors[rotate] = compiled.report.verification.outputs[0].relative_l2
        if rotate:
            graph = compiled.graph
            einsums = graph.ops_of_type("Einsum")
            assert einsums
            for op in einsums:
                for value in graph.inputs_of(op):
                    producer = graph.producer(value)
                    assert producer is None or producer.op_type != "DequantizeLinear"
    assert errors[True] < 0.6 * errors[False], errors


def test_the_target_rotates_int4_presets_unless_told_otherwise():
    from edgeq.options import CompileOptions
    from edgeq.passes.hadamard_rotation import HadamardRotation
    from edgeq.registry import get_target

    x86, fpga = get_target("x86-vnni"), get_target("fpga")
    assert HadamardRotation.from_options(CompileOptions(weights="int4"), x86).enabled
    assert not HadamardRotation.from_options(CompileOptions(weights="int4", rotate=False), x86).enabled
    # W8A8: only where the residual stream folds (test_rotation_default.py)
    assert HadamardRotation.from_options(CompileOptions(), x86).only_with_stream
    assert HadamardRotation.from_options(CompileOptions(rotate=True), x86).enabled
    assert not HadamardRotation.from_options(CompileOptions(weights="int4"), fpga).enabled
