"""The attention-mask bias, recognised by what it computes: the HF float-min product, Where(bool, 0,
-inf), Where selecting the scores, the SDPA bool chain of the dynamo exporter and a decoder's causal
mask with a past length all become the one canonical subgraph; a mask that is not one is left
alone and named."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.frontend.rules.mask import C, canonical_kind
from edgeq.ir import load
from edgeq.models import synthetic
from tests.frontend.graphs import I64, assert_same_outputs, canonicalize, const, kinds, model, node, rng_array, vi
from tests.passes.helpers import run

D = 4
X = rng_array(3, 6, D, seed=1, scale=2.0)
MASK_END = np.array([[1] * 6, [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], np.int64)
MASK_START = MASK_END[:, ::-1].copy()


def _encoder(bias_nodes, *, select: bool = False, inits=()):
    """One head of attention over x [b, s, D] with the bias `bias_nodes` make ("bias", or "cond" for
    a Where selecting the scores), then the exporters' NaN guard."""
    head = [node("Unsqueeze", ["x", "ax1"], ["h"]), node("Transpose", ["h"], ["h_t"], perm=[0, 1, 3, 2]),
            node("MatMul", ["h", "h_t"], ["scores"])]
    if select:
        masked = [node("Where", ["cond", "scores", "neg_inf"], ["masked"])]
    else:
        masked = [node("Add", ["scores", "bias"], ["masked"])]
    tail = [node("Softmax", ["masked"], ["p"], axis=-1), node("IsNaN", ["p"], ["nan"]),
            node("Where", ["nan", "zero", "p"], ["p_safe"]), node("MatMul", ["p_safe", "h"], ["ctx"]),
            node("Squeeze", ["ctx", "ax1"], ["y"])]
    return model([*head, *bias_nodes, *masked, *tail], [vi("x", ["b", "s", D]), vi("attention_mask", ["b", "s"], I64)],
                 [vi("y", ["b", "s", D])],
                 [const("ax1", [1], np.int64), const("ax12", [1, 2], np.int64), const("zero", 0.0),
                  const("neg_inf", -np.inf), const("one", 1.0), const("fmin", np.finfo(np.float32).min), *inits])


CAST_BOOL = [node("Unsqueeze", ["attention_mask", "ax12"], ["m4"]), node("Cast", ["m4"], ["cond"], to=9)]


def _assert_canonical_padding(graph, stats, sites: int = 1) -> None:
    assert stats.get("mask key-padding") == sites, stats
    assert stats.get("attention-nan-guard") == sites
    (softmax,) = graph.ops_of_type("Softmax")
    add = graph.producer(graph.inputs_of(softmax)[0])
    assert add.op_type == "Add" and canonical_kind(graph, graph.inputs_of(add)[1]) == "key-padding"
    assert "IsNaN" not in kinds(graph) and "Where" not in kinds(graph)


@pytest.mark.parametrize("style", ["where-zero-inf", "float-min-product", "where-selects-scores"])
def test_encoder_mask_styles_become_the_canonical_padding_bias(style):
    if style == "where-zero-inf":
        source = _encoder(CAST_BOOL + [node("Where", ["cond", "zero", "neg_inf"], ["bias"])])
    elif style == "float-min-product":  # HF's (1 - mask[:, None, None, :]) * float32.min
        source = _encoder([node("Unsqueeze", ["attention_mask", "ax12"], ["m4"]), node("Cast", ["m4"], ["mf"], to=1),
                           node("Sub", ["one", "mf"], ["inv"]), node("Mul", ["inv", "fmin"], ["bias"])])
    else:
        source = _encoder(CAST_BOOL, select=True)
    graph, stats = canonicalize(source)
    _assert_canonical_padding(graph, stats)
    for mask in (MASK_END, MASK_START):
        assert_same_outputs(source, graph, {"x": X, "attention_mask": mask})


def test_the_canonical_bias_holds_c():
    graph, _ = canonicalize(_encoder(CAST_BOOL + [node("Where", ["cond", "zero", "neg_inf"], ["bias"])]))
    biases = [op for op in graph.ops() if op.op_type == "Mul"]
    assert [float(graph.constant(graph.inputs_of(op)[1]).numpy()) for op in biases] == [C]


@pytest.mark.parametrize("bias_nodes,why", [
    # a finite but small penalty: not a mask's -1e4 or less
    ([node("Unsqueeze", ["attention_mask", "ax12"], ["m4"]), node("Cast", ["m4"], ["mf"], to=1),
      node("Sub", ["one", "mf"], ["inv"]), node("Mul", ["inv", "small"], ["bias"])],
     "its values or shape are not an attention mask's"),
    # the mask shifted by one key: no canonical mask
    ([node("Slice", ["attention_mask", "one_i", "big", "ax1"], ["shifted"]),
      node("Pad", ["shifted", "pads"], ["padded"]), node("Unsqueeze", ["padded", "ax12"], ["m4"]),
      node("Cast", ["m4"], ["cond"], to=9), node("Where", ["cond", "zero", "neg_inf"], ["bias"])],
     "it matches no canonical mask on every probe"),
])
def test_an_unrecognised_mask_is_left_alone_and_named(bias_nodes, why):
    extra = [const("small", -5.0), const("one_i", [1], np.int64), const("big", [1 << 30], np.int64),
             const("pads", [0, 0, 0, 1], np.int64)]
    source = _encoder(bias_nodes, inits=extra)
    graph, stats = canonicalize(source)
    assert {k: n for k, n in stats.items() if k.startswith("mask")} == {f"mask unrecognised: bias ({why})": 1}
    assert graph.producer(graph.value("bias")).op_type == bias_nodes[-1].op_type
    assert_same_outputs(source, graph, {"x": X, "attention_mask": MASK_END})


def test_the_hf_float_min_mask_of_edgeqs_bert_builder():
    source = synthetic.bert()
    graph, stats = canonicalize(source, preprocess=True)
    assert stats["mask key-padding"] == 2 and stats["gelu-formula"] == 2
    softmax_biases = {graph.inputs_of(graph.producer(graph.inputs_of(s)[0]))[1].name
                      for s in graph.ops_of_type("Softmax")}
    assert len(softmax_biases) == 1  # one subgraph shared by every layer
    assert_same_outputs(source, graph, synthetic.bert_feeds(batch=3, seq=9))


def test_a_decoder_mask_with_a_past_length():
    """Edgeq's Llama with a KV cache: Where(And(causal, padding), 0, float32.min), T = past + S."""
    source = synthetic.llama(kv_cache=True)
    graph, stats = canonicalize(source, preprocess=True)
    assert stats["mask causal+padding"] == 2
    (bias,) = {graph.inputs_of(graph.producer(graph.inputs_of(s)[0]))[1] for s in graph.ops_of_type("Softmax")}
    assert canonical_kind(graph, bias) == "causal+padding"
    feeds = synthetic.llama_feeds(batch=2, seq=3, kv_cache=True)
    for name in [n for n in feeds if n.startswith("past_key_values")]:
        feeds[name] = rng_array(2, *feeds[name].shape[1:2], 4, feeds[name].shape[3], seed=len(name))
    feeds["attention_mask"] = np.ones((2, 7), np.int64)
    feeds["attention_mask"][1, 5:] = 0
    assert_same_outputs(source, graph, feeds)


def test_rows_with_every_key_masked_are_the_only_difference():
    """Left padding under a causal mask masks every key of the padded queries: -inf/min gave 0 or
    a uniform average there, c gives the softmax of the raw scores. The other rows are unchanged."""
    source = synthetic.llama()
    graph, _ = canonicalize(load(source))
    feeds = synthetic.llama_feeds(batch=2, seq=8)
    feeds["attention_mask"][1, :3] = 0
    want, got = run(source, feeds)[0], run(graph, feeds)[0]
    attended = feeds["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[attended], want[attended], rtol=1e-4, atol=1e-4 * np.abs(want).max())
