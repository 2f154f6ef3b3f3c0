"""Transformer building blocks, written as torch.onnx exports them, shared by every builder.

Each block takes a `GraphBuilder`, value names and, where it owns parameters, the full module
path that names them; it returns the name of its result. Weights arrive in PyTorch layout
([out, in] for linear layers) and are written once, transposed to the [in, out] of `MatMul`'s B.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from edgeq.models._onnx import GraphBuilder

FLOAT32_MIN = float(np.finfo(np.float32).min)  # the additive mask value of HF models
INT64_MAX = int(np.iinfo(np.int64).max)


def linear(g: GraphBuilder, x: str, weight: np.ndarray, bias: np.ndarray | None,
           module: str) -> str:
    """`MatMul(x, W^T)` then `Add(bias, ·)` — the bias comes first, as torch.onnx writes it."""
    with g.module(module):
        y = g.op("MatMul", x, g.weight("weight", weight.T))
        if bias is not None:
            y = g.op("Add", g.weight("bias", bias), y)
    return y


def layer_norm(g: GraphBuilder, x: str, gamma: np.ndarray, beta: np.ndarray, eps: float,
               module: str) -> str:
    with g.module(module):
        return g.op("LayerNormalization", x, g.weight("weight", gamma), g.weight("bias", beta),
                    axis=-1, epsilon=eps)


def rms_norm(g: GraphBuilder, x: str, gamma: np.ndarray, eps: float, module: str) -> str:
    """HF LlamaRMSNorm decomposed: weight * (x * 1/sqrt(mean(x^2) + eps))."""
    with g.module(module):
        square = g.op("Pow", x, g.constant(2.0))
        variance = g.op("ReduceMean", square, axes=[-1], keepdims=1)
        std = g.op("Sqrt", g.op("Add", variance, g.constant(eps)))
        normed = g.op("Mul", x, g.op("Reciprocal", std))
        return g.op("Mul", g.weight("weight", gamma), normed)


def gelu_erf(g: GraphBuilder, x: str, module: str) -> str:
    """Exact GELU as torch.onnx writes it before opset 20: x * 0.5 * (1 + erf(x / sqrt 2))."""
    with g.module(module):
        erf = g.op("Erf", g.op("Div", x, g.constant(np.sqrt(2.0))))
        return g.op("Mul", g.op("Mul", x, g.op("Add", erf, g.constant(1.0))), g.constant(0.5))


def silu(g: GraphBuilder, x: str, module: str) -> str:
    with g.module(module):
        return g.op("Mul", x, g.op("Sigmoid", x))


def split_heads(g: GraphBuilder, x: str, heads: int, head_dim: int) -> str:
    """[B, S, heads*head_dim] -> [B, heads, S, head_dim]."""
    shaped = g.op("Reshape", x, g.constant([0, 0, heads, head_dim], np.int64))
    return g.op("Transpose", shaped, perm=[0, 2, 1, 3])


def merge_heads(g: GraphBuilder, x: str, hidden: int) -> str:
    """[B, heads, S, head_dim] -> [B, S, hidden]."""
    moved = g.op("Transpose", x, perm=[0, 2, 1, 3])
    return g.op("Reshape", moved, g.constant([0, 0, hidden], np.int64))


def attention_core(g: GraphBuilder, q: str, k: str, v: str, mask: str, head_dim: int,
                   scale_op: str) -> str:
    """softmax(q·kᵀ scaled + mask)·v. BERT divides by sqrt(d) (`Div`), Llama multiplies (`Mul`)."""
    scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]))
    if scale_op == "Div":
        scaled = g.op("Div", scores, g.constant(np.sqrt(head_dim)))
    else:
        scaled = g.op("Mul", scores, g.constant(1.0 / np.sqrt(head_dim)))
    probs = g.op("Softmax", g.op("Add", scaled, mask), axis=-1)
    return g.op("MatMul", probs, v)


def padding_mask(g: GraphBuilder, attention_mask: str) -> str:
    """HF's extended mask: (1 - mask[:, None, None, :]) * float32.min, shape [B, 1, 1, T]."""
    expanded = g.op("Unsqueeze", attention_mask, g.constant([1, 2], np.int64))
    as_float = g.op("Cast", expanded, to=TensorProto.FLOAT)
    return g.op("Mul", g.op("Sub", g.constant(1.0), as_float), g.constant(FLOAT32_MIN))


def causal_padding_mask(g: GraphBuilder, attention_mask: str, query_positions: str,
                        total_length: str) -> str:
    """Additive mask [B, 1, S, T]: 0 where key j <= query position and mask[j] == 1, else min."""
    key_positions = g.op("Range", g.constant(0, np.int64), total_length, g.constant(1, np.int64))
    causal = g.op("LessOrEqual", g.op("Unsqueeze", key_positions, g.constant([0], np.int64)),
                  g.op("Unsqueeze", query_positions, g.constant([1], np.int64)))
    padding = g.op("Cast", g.op("Unsqueeze", attention_mask, g.constant([1, 2], np.int64)),
                   to=TensorProto.BOOL)
    allowed = g.op("And", causal, padding)
    return g.op("Where", allowed, g.constant(0.0), g.constant(FLOAT32_MIN))


def rotary_cos_sin(g: GraphBuilder, positions: str, head_dim: int, theta: float,
                   module: str) -> tuple[str, str]:
    """cos and sin tables [S, head_dim] for the given int64 positions (HF's default RoPE)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    with g.module(module):
        pos = g.op("Unsqueeze", g.op("Cast", positions, to=TensorProto.FLOAT),
                   g.constant([1], np.int64))
        freqs = g.op("Mul", pos, g.weight("inv_freq", inv_freq))
        angles = g.op("Concat", freqs, freqs, axis=-1)
        return g.op("Cos", angles), g.op("Sin", angles)


def apply_rotary(g: GraphBuilder, x: str, cos: str, sin: str, head_dim: int) -> str:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) (HF layout)."""
    half = head_dim // 2
    last = g.constant([-1], np.int64)
    x1 = g.op("Slice", x, g.constant([0], np.int64), g.constant([half], np.int64), last)
    x2 = g.op("Slice", x, g.constant([half], np.int64), g.constant([INT64_MAX], np.int64), last)
    rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def repeat_kv(g: GraphBuilder, x: str, n_rep: int, heads: int, head_dim: int) -> str:
    """[B, kv, T, d] -> [B, kv*n_rep, T, d], as HF's repeat_kv (unsqueeze, expand, reshape)."""
    if n_rep == 1:
        return x
    unsqueezed = g.op("Unsqueeze", x, g.constant([2], np.int64))
    expanded = g.op("Expand", unsqueezed, g.constant([1, 1, n_rep, 1, 1], np.int64))
    return g.op("Reshape", expanded, g.constant([0, heads, -1, head_dim], np.int64))
