"""KV-cache quantization (KIVI, Liu et al. 2024; QuaRot, Ashkboos et al. 2024).

KIVI: keys have outlier channels (a few head dims large for every token), so each channel gets
its own scale; values have no channel structure but vary by token, so each cached token gets
its own. Static per-channel scales are calibrated absmax per kv head and head dim ([1, H, 1, D]);
per-token scales are computed as each token is written and stored in the cache beside the codes
as float16. QuaRot: after a head-dim Hadamard rotation the keys' outlier channels are spread over
the token, and keys quantize well per token too (`keys="token"`). Per-token parameters may be
asymmetric (a scale and an offset per token: no codes spent on values the token never takes)
and per group of `group` channels within the head dim. `values="channel"` gives values static
per-channel scales (no scale tensors in the cache: the layout ONNX Runtime's
GroupQueryAttention takes for a quantized cache, `PER_CHANNEL`, where K and V use one mode).

Symmetric codes are int8 in [-127, 127] or int4 in [-7, 7]; asymmetric ones [-128, 127] or
[-8, 7] around the offset (x = scale * q + offset). int4 codes are packed two per byte along the
head dim (uint8 `low + 16 * high`, codes stored +8), so the cache tensors are [B, H, T, D/2]
uint8. A per-token tensor's parameters are one float16 tensor [B, H, T, P] beside it: per group
its scale (and, asymmetric, its offset next to it), P = groups or 2 * groups. The graph side is
plain ONNX of any opset from 13 (Div, Round, Clip, Cast; packing and unpacking in float
arithmetic, exact for these small integers): what `quantize_into_cache` and
`dequantize_from_cache` add; ONNX Runtime's CPU provider runs it. Bytes per token count every
layer's key and value codes plus their per-token parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx

from edgeq.errors import OptionError
from edgeq.ir import Graph, Value

SCALE_DTYPE = np.float16  # per-token scales (and offsets) as stored in the cache
_EPS = 1e-8


@dataclass(frozen=True)
class KvCacheScheme:
    bits: Literal[8, 4] = 8
    values: Literal["token", "channel"] = "token"
    keys: Literal["channel", "token"] = "channel"
    asymmetric: bool = False   # per-token parameters: a scale and an offset (static ones stay symmetric)
    group: int = 0             # per-token: one scale per `group` channels of the head dim (0: the whole head)

    def __post_init__(self) -> None:
        if self.bits not in (8, 4):
            raise OptionError(f"KV cache bits must be 8 or 4, got {self.bits}", fix="use 8 or 4")
        if self.values not in ("token", "channel"):
            raise OptionError(f"value granularity '{self.values}' is not token or channel", fix="use token or channel")
        if self.keys not in ("token", "channel"):
            raise OptionError(f"key granularity '{self.keys}' is not token or channel", fix="use token or channel")
        if self.group < 0:
            raise OptionError(f"KV cache group size must be 0 (the whole head) or more, got {self.group}",
                              fix="use a divisor of the head dim, or 0")

    def per_token(self, kind: str | None) -> bool:
        """Whether the cache tensor of this kind ('key'/'value') has per-token scales."""
        return (self.keys if kind == "key" else self.values) == "token"

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else 7

    def code_range(self, per_token: bool) -> tuple[int, int]:
        """(lowest, highest) code: symmetric [-qmax, qmax]; asymmetric per-token [-2^(b-1), 2^(b-1) - 1]."""
        if per_token and self.asymmetric:
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        return -self.qmax, self.qmax

    def groups(self, head_dim: int) -> int:
        if self.group and head_dim % self.group:
            raise OptionError(f"KV cache group size {self.group} does not divide the head dim {head_dim}",
                              fix="use a divisor of the head dim, or 0 (the whole head)")
        return head_dim // self.group if self.group else 1

    def params_per_token(self, head_dim: int) -> int:
        """float16 numbers one per-token tensor stores a token and head (scales and offsets)."""
        return self.groups(head_dim) * (2 if self.asymmetric else 1)

    @property
    def label(self) -> str:
        token = ("asymmetric " if self.asymmetric else "") + "per token" + (f" (groups of {self.group})" if self.group else "")
        side = {"channel": "per channel", "token": token}
        return f"int{self.bits} (keys {side[self.keys]}, values {side[self.values]})"

    def bytes_per_token(self, layers: int, kv_heads: int, head_dim: int) -> float:
        """Cache bytes one token adds over all layers (codes + per-token scales and offsets)."""
        codes = kv_heads * head_dim * self.bits / 8
        params = kv_heads * self.params_per_token(head_dim) * np.dtype(SCALE_DTYPE).itemsize
        return layers * sum(codes + (params if self.per_token(kind) else 0) for kind in ("key", "value"))


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


def token_fake_quant_reference(x: np.ndarray, scheme: KvCacheScheme) -> np.ndarray:
    """x [..., D] quantized per token (and group) and dequantized, as the cache stores and reads it."""
    groups = scheme.groups(x.shape[-1])
    xg = x.reshape(*x.shape[:-1], groups, -1).astype(np.float32)
    lo, hi = scheme.code_range(True)
    if scheme.asymmetric:
        low, high = xg.min(axis=-1, keepdims=True), xg.max(axis=-1, keepdims=True)
        scale = np.maximum(high - low, _EPS) / (hi - lo)
        offset = (low - lo * scale).astype(SCALE_DTYPE).astype(np.float32)
    else:
        scale, offset = np.maximum(np.abs(xg).max(axis=-1, keepdims=True), _EPS) / scheme.qmax, 0.0
    scale = scale.astype(SCALE_DTYPE).astype(np.float32)
    q = np.clip(np.round((xg - offset) / scale), lo, hi)
    return (q * scale + offset).reshape(x.shape)


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

    def shape(self, name: str, dims: list[int]) -> Value:
        return self.const(name, np.array(dims, np.int64))


@dataclass(frozen=True)
class TokenParams:
    """Per-token quantization parameters in the graph: `scale` and `offset` (None: symmetric) as
    float32 [B, H, S, G, 1] (the float16 values cast back), and `stored`, the float16
    [B, H, S, P] the cache carries."""

    scale: Value
    offset: Value | None
    stored: Value


def token_params(graph: Graph, x: Value, scheme: KvCacheScheme, head_dim: int, prefix: str) -> TokenParams:
    """Per-token (and group) parameters of `x` [B, H, S, D]. The float32 ones are the float16
    values cast back, so that the codes are computed with exactly what dequantizes them."""
    b = _Builder(graph, prefix)
    groups = scheme.groups(head_dim)
    grouped = b.op("Reshape", x, b.shape("grouped_shape", [0, 0, 0, groups, -1]))
    opset = graph.model.opset_imports.get("", 21) if graph.model is not None else 21

    def reduce(op_type: str, value: Value) -> Value:
        if opset >= 18:  # ReduceMax/Min take their axes as an input from opset 18 on
            return b.op(op_type, value, b.shape("axes", [-1]), keepdims=1)
        return b.op(op_type, value, axes=[-1], keepdims=1)

    eps = b.const("eps", np.float32(_EPS))
    if scheme.asymmetric:
        lo, hi = scheme.code_range(True)
        low, high = reduce("ReduceMin", grouped), reduce("ReduceMax", grouped)
        scale = b.op("Div", b.op("Max", b.op("Sub", high, low), eps), b.const("levels", np.float32(hi - lo)))
        offset = b.op("Sub", low, b.op("Mul", scale, b.const("lowest", np.float32(lo))))
        params = b.op("Concat", scale, offset, axis=-1)             # [B, H, S, G, 2]
    else:
        absmax = reduce("ReduceMax", b.op("Abs", grouped))
        params = b.op("Div", b.op("Max", absmax, eps), b.const("qmax_f", np.float32(scheme.qmax)))  # [B, H, S, G, 1]
    stored16 = b.op("Cast", params, to=onnx.TensorProto.FLOAT16)
    stored = b.op("Reshape", stored16, b.shape("stored_shape", [0, 0, 0, -1]))
    scale, offset = split_token_params(graph, stored16, scheme, prefix)
    return TokenParams(scale, offset, stored)


def split_token_params(graph: Graph, params16: Value, scheme: KvCacheScheme, prefix: str,
                       head_dim: int | None = None) -> tuple[Value, Value | None]:
    """float32 (scale, offset or None) [B, H, T, G, 1] from float16 parameters: [B, H, T, G, 1|2],
    or, with `head_dim`, the cache's [B, H, T, P]."""
    b = _Builder(graph, prefix)
    if head_dim is not None:
        per_group = 2 if scheme.asymmetric else 1
        params16 = b.op("Reshape", params16, b.shape("params_shape", [0, 0, 0, scheme.groups(head_dim), per_group]))
    params = b.op("Cast", params16, to=onnx.TensorProto.FLOAT)
    if not scheme.asymmetric:
        return params, None
    axis = b.shape("axis_last", [-1])
    scale = b.op("Slice", params, b.shape("zero", [0]), b.shape("one", [1]), axis)
    offset = b.op("Slice", params, b.shape("one_", [1]), b.shape("two", [2]), axis)
    return scale, offset


def quantize_into_cache(graph: Graph, x: Value, scale: Value, scheme: KvCacheScheme, prefix: str,
                        offset: Value | None = None, head_dim: int | None = None) -> Value:
    """Codes of float `x` [B, H, S, D] with `scale` (broadcast; static [1, H, 1, D], or with
    `head_dim` per-token [B, H, S, G, 1] and `offset`), as the cache stores them: int8
    [B, H, S, D], or int4 packed into uint8 [B, H, S, D/2]."""
    b = _Builder(graph, prefix)
    per_token = head_dim is not None
    low, high = scheme.code_range(per_token)
    lo, hi = b.const("qmin", np.float32(low)), b.const("qmax", np.float32(high))
    if per_token:
        x = b.op("Reshape", x, b.shape("grouped_shape", [0, 0, 0, scheme.groups(head_dim), -1]))
        if offset is not None:
            x = b.op("Sub", x, offset)
    codes = b.op("Clip", b.op("Round", b.op("Div", x, scale)), lo, hi)
    if per_token:
        codes = b.op("Reshape", codes, b.shape("codes_shape", [0, 0, 0, head_dim]))
    if scheme.bits == 8:
        return b.op("Cast", codes, to=onnx.TensorProto.INT8)
    shifted = b.op("Add", codes, b.const("offset", np.float32(8.0)))
    pairs = b.op("Reshape", shifted, b.shape("pairs_shape", [0, 0, 0, -1, 2]))
    low_half, high_half = _split_last(b, pairs)
    packed = b.op("Add", low_half, b.op("Mul", high_half, b.const("sixteen", np.float32(16.0))))
    packed = b.op("Squeeze", packed, b.shape("last", [-1]))
    return b.op("Cast", packed, to=onnx.TensorProto.UINT8)


def _split_last(b: _Builder, pairs: Value) -> tuple[Value, Value]:
    axis = b.shape("axis_last", [-1])
    low = b.op("Slice", pairs, b.shape("zero", [0]), b.shape("one", [1]), axis)
    high = b.op("Slice", pairs, b.shape("one_", [1]), b.shape("two", [2]), axis)
    return low, high


def dequantize_from_cache(graph: Graph, codes: Value, scale: Value, scheme: KvCacheScheme, head_dim: int,
                          prefix: str, offset: Value | None = None, per_token: bool = False) -> Value:
    """Float values [B, H, T, D] of cache codes (int8, or packed int4) times `scale` (static
    [1, H, 1, D], or `per_token` [B, H, T, G, 1]) plus `offset` (asymmetric per-token)."""
    b = _Builder(graph, prefix)
    if scheme.bits == 8:
        as_float = b.op("Cast", codes, to=onnx.TensorProto.FLOAT)
    else:
        packed = b.op("Cast", codes, to=onnx.TensorProto.FLOAT)
        high = b.op("Floor", b.op("Div", packed, b.const("sixteen", np.float32(16.0))))
        low = b.op("Sub", packed, b.op("Mul", high, b.const("sixteen_", np.float32(16.0))))
        last = b.shape("last", [-1])
        pairs = b.op("Concat", b.op("Unsqueeze", low, last), b.op("Unsqueeze", high, last), axis=-1)
        unpacked = b.op("Reshape", pairs, b.shape("unpacked_shape", [0, 0, 0, head_dim]))
        as_float = b.op("Sub", unpacked, b.const("offset", np.float32(8.0)))
    if not per_token:
        return b.op("Mul", as_float, scale)
    grouped = b.op("Reshape", as_float, b.shape("grouped_shape", [0, 0, 0, scheme.groups(head_dim), -1]))
    values = b.op("Mul", grouped, scale)
    if offset is not None:
        values = b.op("Add", values, offset)
    return b.op("Reshape", values, b.shape("values_shape", [0, 0, 0, head_dim]))
