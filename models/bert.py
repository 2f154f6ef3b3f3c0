"""A BERT encoder (HF `BertModel` without pooler) as an ONNX graph, from weights in HF naming."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from edgeq.models import blocks
from edgeq.models._onnx import GraphBuilder

Weights = Mapping[str, np.ndarray]

INPUT_DIMS = ["batch", "sequence"]


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, config: Mapping[str, object]) -> BertConfig:
        """From a Hugging Face `config.json` of a BertModel."""
        return cls(vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
                   num_layers=int(config["num_hidden_layers"]),
                   num_heads=int(config["num_attention_heads"]),
                   intermediate_size=int(config["intermediate_size"]),
                   max_positions=int(config["max_position_embeddings"]),
                   type_vocab_size=int(config["type_vocab_size"]),
                   layer_norm_eps=float(config["layer_norm_eps"]))


def build_bert(config: BertConfig, weights: Weights, *, name: str = "bert",
               metadata: Mapping[str, str] | None = None) -> onnx.ModelProto:
    """Inputs input_ids, attention_mask, token_type_ids (int64 [batch, sequence]);
    output last_hidden_state (float32 [batch, sequence, hidden])."""
    g = GraphBuilder(name)
    input_ids = g.input("input_ids", TensorProto.INT64, INPUT_DIMS)
    attention_mask = g.input("attention_mask", TensorProto.INT64, INPUT_DIMS)
    token_type_ids = g.input("token_type_ids", TensorProto.INT64, INPUT_DIMS)
    hidden = _embeddings(g, config, weights, input_ids, token_type_ids)
    mask = blocks.padding_mask(g, attention_mask)
    for i in range(config.num_layers):
        hidden = _layer(g, config, weights, f"encoder.layer.{i}", hidden, mask)
    g.output(hidden, "last_hidden_state", TensorProto.FLOAT, [*INPUT_DIMS, config.hidden_size])
    return g.model(metadata=metadata)


def _embeddings(g: GraphBuilder, config: BertConfig, w: Weights, input_ids: str,
                token_type_ids: str) -> str:
    with g.module("embeddings"):
        words = g.op("Gather", g.weight("word_embeddings.weight",
                                        w["embeddings.word_embeddings.weight"]), input_ids)
        types = g.op("Gather", g.weight("token_type_embeddings.weight",
                                        w["embeddings.token_type_embeddings.weight"]), token_type_ids)
        positions = _position_ids(g, config, input_ids)
        where = g.op("Gather", g.weight("position_embeddings.weight",
                                        w["embeddings.position_embeddings.weight"]), positions)
        summed = g.op("Add", g.op("Add", words, types), where)
    return _layer_norm(g, config, w, "embeddings.LayerNorm", summed)


def _position_ids(g: GraphBuilder, config: BertConfig, input_ids: str) -> str:
    """position_ids[:, :seq_len] sliced from the registered buffer, as the exporter writes it."""
    buffer = np.arange(config.max_positions, dtype=np.int64)[None, :]
    seq_len = g.op("Gather", g.op("Shape", input_ids), g.constant(1, np.int64), axis=0)
    end = g.op("Unsqueeze", seq_len, g.constant([0], np.int64))
    return g.op("Slice", g.weight("position_ids", buffer), g.constant([0], np.int64), end,
                g.constant([1], np.int64))


def _layer(g: GraphBuilder, config: BertConfig, w: Weights, prefix: str, hidden: str,
           mask: str) -> str:
    """One post-norm encoder layer (HF BertLayer, eager attention)."""

    def linear(x: str, path: str) -> str:
        module = f"{prefix}.{path}"
        return blocks.linear(g, x, w[f"{module}.weight"], w[f"{module}.bias"], module)

    def heads(x: str) -> str:
        return blocks.split_heads(g, x, config.num_heads, config.head_dim)

    q = linear(hidden, "attention.self.query")
    k = linear(hidden, "attention.self.key")
    v = linear(hidden, "attention.self.value")
    with g.module(f"{prefix}.attention.self"):
        context = blocks.attention_core(g, heads(q), heads(k), heads(v), mask, config.head_dim,
                                        scale_op="Div")
        context = blocks.merge_heads(g, context, config.hidden_size)
    attn_out = linear(context, "attention.output.dense")
    with g.module(f"{prefix}.attention.output"):
        residual = g.op("Add", attn_out, hidden)
    hidden = _layer_norm(g, config, w, f"{prefix}.attention.output.LayerNorm", residual)
    up = linear(hidden, "intermediate.dense")
    act = blocks.gelu_erf(g, up, f"{prefix}.intermediate.intermediate_act_fn")
    down = linear(act, "output.dense")
    with g.module(f"{prefix}.output"):
        residual = g.op("Add", down, hidden)
    return _layer_norm(g, config, w, f"{prefix}.output.LayerNorm", residual)


def _layer_norm(g: GraphBuilder, config: BertConfig, w: Weights, module: str, x: str) -> str:
    return blocks.layer_norm(g, x, w[f"{module}.weight"], w[f"{module}.bias"],
                             config.layer_norm_eps, module)
