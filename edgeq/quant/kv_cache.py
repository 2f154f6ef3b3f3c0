"""KV-cache quantization (KIVI, Liu et al. 2024): keys per channel, values per token.

Keys have outlier channels (a few head dims large for every token), so each channel gets its
own scale; values have no channel structure but vary by token, so each cached token gets its
own. Here the key scales are static (calibrated absmax per kv head and head dim, shape
[1, H, 1, D]) and the value scales are computed as each token is written (absmax over its head
dim, [B, H, T, 1], stored in the cache beside the values as float16). `values="channel"` gives
values static per-channel scales too (no scale tensors in the cache: the layout ONNX Runtime's
GroupQueryAttention takes for a quantized cache, `PER_CHANNEL`, where K and V must use one mode).

Both are symmetric (zero point 0), int8 in [-127, 127] or int4 in [-7, 7]. int4 codes are packed
two per byte along the head dim (uint8 `low + 16 * high`, codes stored +8), so the cache
tensors are [B, H, T, D/2] uint8. The graph side is plain ONNX of any opset from 13 (Div, Round,
Clip, Cast; packing and unpacking in float arithmetic, exact for these small integers): what
`quantize_into_cache` and `dequantize_from_cache` add; ONNX Runtime's CPU provider runs it. Bytes per token count every layer's key and value codes plus their per-token scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx

from edgeq.errors import OptionError
from edgeq.ir import Graph, Value

SCALE_DTYPE = np.float16  # per-token value scales as stored in the cache
_EPS = 1e-8


@dataclass(frozen=True)
class KvCacheScheme:
    bits: Literal[8, 4] = 8
    values: Literal["token", "channel"] = "token"

    def __post_init__(self) -> None:
        if self.bits not in (8, 4):
            raise OptionError(f"KV cache bits must be 8 or 4, got {self.bits}", fix="use 8 or 4")
        if self.values not in ("token", "channel"):
            raise OptionError(f"value granularity '{self.values}' is not token or channel", fix="use token or channel")

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else 7

    @property
    def label(self) -> str:
        return f"int{self.bits} (keys per channel, values per {self.values})"

    def bytes_per_token(self, layers: int, kv_heads: int, head_dim: int) -> float:
        """Cache bytes one token adds over all layers (codes + per-token scales)."""
        codes = kv_heads * head_dim * self.bits / 8
        scales = kv_heads * np.dtype(SCALE_DTYPE).itemsize if self.values == "token" else 0
        return layers * (2 * codes + scales)


def float_bytes_per_token(layers: int, kv_heads: int, head_dim: int, itemsize: int = 4) -> int:
    return layers * 2 * kv_heads * head_dim * itemsize


def channel_scales(absmax: np.ndarray, scheme: KvCacheScheme) -> np.ndarray:
    """Static per-channel scales [1, H, 1, D] from the calibrated absmax [H, D]."""
    scale = np.maximum(np.asarray(absmax, np.float64), _EPS) / scheme.qmax
    return scale.astype(np.float32)[None, :, None, :]


def cache_dtype(scheme: KvCacheScheme) -> int:
    return onnx.TensorProto.INT8 if scheme.bits == 8 else onnx.TensorProto.UINT8


def cache_width(head_dim: int, scheme: KvCacheScheme) -> int:
    if scheme.bits == 4 and head_dim % 2:
        raise OptionError(f"int4 cache packs two codes a byte and head dim {head_dim} is odd", fix="use an int8 cache")
    return head_dim if scheme.bits == 8 else head_dim // 2


# ---- reference math (numpy), as the graph computes it -------------------------------------------

def quantize_reference(x: np.ndarray, scale: np.ndarray, scheme: KvCacheScheme) -> np.ndarray:
    q = np.clip(np.round(x / scale), -scheme.qmax, scheme.qmax)
    return q.astype(np.int8)


def token_scales_reference(x: np.ndarray, scheme: KvCacheScheme) -> np.ndarray:
    absmax = np.abs(x).max(axis=-1, keepdims=True)
    return (np.maximum(absmax, _EPS) / scheme.qmax).astype(SCALE_DTYPE).astype(np.float32)


# ---- graph building --------------------------------------------------------------------------

class _Builder:
    """Adds ops to `graph` next to `anchor`, naming them after `prefix`."""

    def __init__(self, graph: Graph, prefix: str):
        self.graph = graph
        self.prefix = prefix

    def op(self, op_type: str, *inputs: Value | None, **attrs) -> Value:
        op = self.graph.add_op(op_type, list(inputs), [f"{self.prefix}/{op_type}"],
                               name=self.graph.unique_op_name(f"{self.prefix}/{op_type}"), attrs=attrs or None)
        return self.graph.outputs_of(op)[0]

    def const(self, name: str, array: np.ndarray) -> Value:
        return self.graph.add_constant(self.graph.unique_name(f"{self.prefix}/{name}"), np.asarray(array))


def quantize_into_cache(graph: Graph, x: Value, scale: Value, scheme: KvCacheScheme, prefix: str) -> Value:
    """Codes of float `x` [B, H, S, D] with `scale` (broadcast), as the cache stores them:
    int8 [B, H, S, D], or int4 packed into uint8 [B, H, S, D/2]."""
    b = _Builder(graph, prefix)
    lo, hi = b.const("qmin", np.float32(-scheme.qmax)), b.const("qmax", np.float32(scheme.qmax))
    codes = b.op("Clip", b.op("Round", b.op("Div", x, scale)), lo, hi)
    if scheme.bits == 8:
        return b.op("Cast", codes, to=onnx.TensorProto.INT8)
    shifted = b.op("Add", codes, b.const("offset", np.float32(8.0)))
    pairs = b.op("Reshape", shifted, b.const("pairs_shape", np.array([0, 0, 0, -1, 2], np.int64)))
    low, high = _split_last(b, pairs)
    packed = b.op("Add", low, b.op("Mul", high, b.const("sixteen", np.float32(16.0))))
    packed = b.op("Squeeze", packed, b.const("last", np.array([-1], np.int64)))
    return b.op("Cast", packed, to=onnx.TensorProto.UINT8)


def _split_last(b: _Builder, pairs: Value) -> tuple[Value, Value]:
    axis = b.const("axis_last", np.array([-1], np.int64))
    low = b.op("Slice", pairs, b.const("zero", np.array([0], np.int64)), b.const("one", np.array([1], np.int64)), axis)
    high = b.op("Slice", pairs, b.const("one_", np.array([1], np.int64)), b.const("two", np.array([2], np.int64)), axis)
    return low, high


def dequantize_from_cache(graph: Graph, codes: Value, scale: Value, scheme: KvCacheScheme, head_dim: int,
                          prefix: str) -> Value:
    """Float values [B, H, T, D] of cache codes (int8, or packed int4) times `scale`."""
    b = _Builder(graph, prefix)
    if scheme.bits == 8:
        as_float = b.op("Cast", codes, to=onnx.TensorProto.FLOAT)
    else:
        packed = b.op("Cast", codes, to=onnx.TensorProto.FLOAT)
        high = b.op("Floor", b.op("Div", packed, b.const("sixteen", np.float32(16.0))))
        low = b.op("Sub", packed, b.op("Mul", high, b.const("sixteen_", np.float32(16.0))))
        last = b.const("last", np.array([-1], np.int64))
        pairs = b.op("Concat", b.op("Unsqueeze", low, last), b.op("Unsqueeze", high, last), axis=-1)
        unpacked = b.op("Reshape", pairs, b.const("unpacked_shape", np.array([0, 0, 0, head_dim], np.int64)))
        as_float = b.op("Sub", unpacked, b.const("offset", np.float32(8.0)))
    return b.op("Mul", as_float, scale)


def token_scales(graph: Graph, x: Value, scheme: KvCacheScheme, prefix: str) -> tuple[Value, Value]:
    """Per-token scales of `x` [B, H, S, D]: (float32 [B, H, S, 1] used to quantize, the same
    as float16 for the cache). The float32 one is the float16 value cast back, so that the
    codes are divided by exactly the scale that dequantizes them."""
    b = _Builder(graph, prefix)
    opset = graph.model.opset_imports.get("", 21) if graph.model is not None else 21
    if opset >= 18:  # ReduceMax takes its axes as an input from opset 18 on
        absmax = b.op("ReduceMax", b.op("Abs", x), b.const("axes", np.array([-1], np.int64)), keepdims=1)
    else:
        absmax = b.op("ReduceMax", b.op("Abs", x), axes=[-1], keepdims=1)
    scale = b.op("Div", b.op("Max", absmax, b.const("eps", np.float32(_EPS))), b.const("qmax_f", np.float32(scheme.qmax)))
    stored = b.op("Cast", scale, to=onnx.TensorProto.FLOAT16)
    return b.op("Cast", stored, to=onnx.TensorProto.FLOAT), stored
