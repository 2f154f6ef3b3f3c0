"""A Llama-style decoder (HF `LlamaForCausalLM`, eager attention) as an ONNX graph.

Pre-norm layers with decomposed RMSNorm, RoPE in HF's rotate-half layout, grouped-query
attention, SwiGLU MLP, optional tied embeddings. With `kv_cache=True` the graph takes
`past_key_values.N.key/value` [batch, kv_heads, past, head_dim] and returns
`present.N.key/value` [batch, kv_heads, past + sequence, head_dim] (keys after RoPE, as HF caches
them); `attention_mask` then covers past and new tokens, [batch, past + sequence].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from edgeq.models import blocks
from edgeq.models._onnx import GraphBuilder

Weights = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class _Context:
    """Values every layer reads: the rotary tables and the additive attention mask."""
    cos: str
    sin: str
    mask: str


def build_llama(config: LlamaConfig, weights: Weights, *, kv_cache: bool = False,
                name: str = "llama", metadata: Mapping[str, str] | None = None) -> onnx.ModelProto:
    """Inputs input_ids, attention_mask (int64) [+ past key/values]; output logits [+ present]."""
    g = GraphBuilder(name)
    input_ids = g.input("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask_dims = ["batch", "past_sequence + sequence" if kv_cache else "sequence"]
    attention_mask = g.input("attention_mask", TensorProto.INT64, mask_dims)
    cache_dims = ["batch", config.num_kv_heads, "past_sequence", config.head_dim]
    past = [(g.input(f"past_key_values.{i}.key", TensorProto.FLOAT, cache_dims),
             g.input(f"past_key_values.{i}.value", TensorProto.FLOAT, cache_dims))
            for i in range(config.num_layers)] if kv_cache else [None] * config.num_layers

    with g.module("model"):
        hidden = g.op("Gather", g.weight("embed_tokens.weight", weights["model.embed_tokens.weight"]),
                      input_ids)
        context = _context(g, config, input_ids, attention_mask, past[0])
    presents = []
    for i in range(config.num_layers):
        hidden, present = _layer(g, config, weights, i, hidden, context, past[i])
        presents.append(present)
    hidden = blocks.rms_norm(g, hidden, weights["model.norm.weight"], config.rms_norm_eps, "model.norm")
    logits = blocks.linear(g, hidden, _lm_head(config, weights), None, "lm_head")

    g.output(logits, "logits", TensorProto.FLOAT, ["batch", "sequence", config.vocab_size])
    if kv_cache:
        present_dims = ["batch", config.num_kv_heads, "past_sequence + sequence", config.head_dim]
        for i, (key, value) in enumerate(presents):
            g.output(key, f"present.{i}.key", TensorProto.FLOAT, present_dims)
            g.output(value, f"present.{i}.value", TensorProto.FLOAT, present_dims)
    return g.model(metadata=metadata)


def _lm_head(config: LlamaConfig, weights: Weights) -> np.ndarray:
    # Tied: the exporter writes the transposed embedding as a separate MatMul initializer.
    return weights["model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]


def _context(g: GraphBuilder, config: LlamaConfig, input_ids: str, attention_mask: str,
             past: tuple[str, str] | None) -> _Context:
    """Positions past..past+S-1 (HF's cache_position), their RoPE tables and the causal mask."""
    seq_len = g.op("Gather", g.op("Shape", input_ids), g.constant(1, np.int64), axis=0)
    if past is None:
        past_len = g.constant(0, np.int64)
    else:
        past_len = g.op("Gather", g.op("Shape", past[0]), g.constant(2, np.int64), axis=0)
    total_len = g.op("Add", past_len, seq_len)
    positions = g.op("Range", past_len, total_len, g.constant(1, np.int64))
    cos, sin = blocks.rotary_cos_sin(g, positions, config.head_dim, config.rope_theta,
                                     "model.rotary_emb")
    mask = blocks.causal_padding_mask(g, attention_mask, positions, total_len)
    return _Context(cos=cos, sin=sin, mask=mask)


def _layer(g: GraphBuilder, config: LlamaConfig, w: Weights, index: int, hidden: str,
           context: _Context, past: tuple[str, str] | None) -> tuple[str, tuple[str, str]]:
    """One pre-norm decoder layer; returns the new hidden state and the (key, value) it cached."""
    prefix = f"model.layers.{index}"

    def linear(x: str, path: str) -> str:
        module = f"{prefix}.{path}"
        return blocks.linear(g, x, w[f"{module}.weight"], None, module)

    normed = blocks.rms_norm(g, hidden, w[f"{prefix}.input_layernorm.weight"], config.rms_norm_eps,
                             f"{prefix}.input_layernorm")
    q = linear(normed, "self_attn.q_proj")
    k = linear(normed, "self_attn.k_proj")
    v = linear(normed, "self_attn.v_proj")
    with g.module(f"{prefix}.self_attn"):
        q, key, value = _rotated_heads(g, config, context, q, k, v)
        if past is not None:
            key = g.op("Concat", past[0], key, axis=2)
            value = g.op("Concat", past[1], value, axis=2)
        n_rep = config.num_heads // config.num_kv_heads
        attn = blocks.attention_core(
            g, q, blocks.repeat_kv(g, key, n_rep, config.num_heads, config.head_dim),
            blocks.repeat_kv(g, value, n_rep, config.num_heads, config.head_dim),
            context.mask, config.head_dim, scale_op="Mul")
        attn = blocks.merge_heads(g, attn, config.hidden_size)
    attn_out = linear(attn, "self_attn.o_proj")
    with g.module(prefix):
        hidden = g.op("Add", hidden, attn_out)

    normed = blocks.rms_norm(g, hidden, w[f"{prefix}.post_attention_layernorm.weight"],
                             config.rms_norm_eps, f"{prefix}.post_attention_layernorm")
    gate = blocks.silu(g, linear(normed, "mlp.gate_proj"), f"{prefix}.mlp.act_fn")
    up = linear(normed, "mlp.up_proj")
    with g.module(f"{prefix}.mlp"):
        gated = g.op("Mul", gate, up)
    down = linear(gated, "mlp.down_proj")
    with g.module(prefix):
        hidden = g.op("Add", hidden, down)
    return hidden, (key, value)


def _rotated_heads(g: GraphBuilder, config: LlamaConfig, context: _Context, q: str, k: str,
                   v: str) -> tuple[str, str, str]:
    """Split q/k/v into heads and apply RoPE to q and k."""
    d = config.head_dim
    q = blocks.apply_rotary(g, blocks.split_heads(g, q, config.num_heads, d), context.cos, context.sin, d)
    k = blocks.apply_rotary(g, blocks.split_heads(g, k, config.num_kv_heads, d), context.cos,
                            context.sin, d)
    return q, k, blocks.split_heads(g, v, config.num_kv_heads, d)
