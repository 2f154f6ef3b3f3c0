"""Integer program steps a Llama-style decoder adds to the encoder's (edgeq.backends.fpga.integer.program):

    RmsNormInt     edgeq.backends.fpga.integer.Normalization, not centred (RMSNorm, exact isqrt)
    SiluInt        edgeq.backends.fpga.integer.Silu (i-exp sigmoid times x)
    MulInt         a * b elementwise in int64, saturated (SwiGLU's silu(gate) * up, the rotary
                   products x * cos and rotate_half(x) * sin): no rounding, the scales multiply
    NegInt         -x in a wider dtype (exact: -(-128) = 128 needs int16)
    SliceInt       Slice with constant starts/ends/axes/steps (rotate_half's halves)
    ConcatInt      Concat of integer tensors of one scale, in the widest dtype
    UnsqueezeInt   Unsqueeze with constant axes (GQA's repeat of the key/value heads)
    ExpandInt      Expand to a constant shape (GQA)
    CausalMask     the additive int32 mask of the canonical causal (+ padding) bias from positions:
                   key j is masked for query i unless j <= T - S + i (T keys: dim 1 of the 0/1
                   attention mask, S queries: dim 1 of the ids), and with `padding` unless
                   mask[b, j] == 1; each masked term adds MASK_TERM (-2^30), as the float
                   bias adds c per term, so a doubly masked key is 2^30 below a singly masked one
                   and a fully masked row keeps the float graph's softmax

Every step's numpy `run` is the bit-exact mirror of the ONNX nodes its `emit` appends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

import edgeq.backends.fpga.integer.ops as ops
from edgeq.backends.fpga.integer.builder import QTensor
from edgeq.backends.fpga.integer.fixedpoint import np_saturate
from edgeq.backends.fpga.integer.norm import Normalization
from edgeq.backends.fpga.integer.sigmoid import Silu
from edgeq.backends.fpga.integer.step import Scale, Step, dtype_of
from edgeq.errors import OptionError

MASK_TERM = -(1 << 30)   # one masked term (causal or padding) of the additive mask; two sum to int32 min


def _declare_input(b, name: str, dtype=np.int64) -> None:
    if not b.knows(name):
        b.declare_value(name, dtype)


@dataclass(frozen=True)
class RmsNormInt(Step):
    """RMSNorm over the last axis: y = gamma * x / sqrt(mean(x^2) + eps); per-channel output
    scales fold into gamma as in LayerNormInt."""

    x: str
    in_scale: float
    in_dtype: str
    gamma: tuple[float, ...]
    eps: float
    out_scale: Scale
    out: str = ""
    unit: str = ""
    out_dtype: str = "int8"      # int16: read by a HadamardInt before its int8 requantization
    kind: ClassVar[str] = "RmsNormInt"

    def inputs(self):
        return (self.x,)

    def plan(self) -> Normalization:
        scales = np.asarray(self.out_scale, np.float64)
        coarsest = float(scales.max())
        gamma = np.asarray(self.gamma, np.float64) * (coarsest / scales)
        return Normalization.plan(centered=False, in_scale=self.in_scale, in_dtype=dtype_of(self.in_dtype),
                                  gamma=gamma, beta=None, eps=self.eps, out_scale=coarsest,
                                  out_dtype=dtype_of(self.out_dtype))

    def emit(self, b):
        return self.plan().emit(b, QTensor(self.x, b.dtype(self.x), self.in_scale)).name

    def run(self, env):
        return self.plan().reference(env[self.x])


@dataclass(frozen=True)
class SiluInt(Step):
    x: str
    in_scale: float
    out_scale: float
    out: str = ""
    unit: str = ""
    out_dtype: str = "int8"      # int16: SwiGLU's 16-bit operand of its product with `up`
    kind: ClassVar[str] = "SiluInt"

    def inputs(self):
        return (self.x,)

    def plan(self) -> Silu:
        return Silu.plan(self.in_scale, self.out_scale, dtype_of(self.out_dtype))

    def emit(self, b):
        return self.plan().emit(b, QTensor(self.x, b.dtype(self.x), self.in_scale)).name

    def run(self, env):
        return self.plan().reference(env[self.x])


@dataclass(frozen=True)
class MulInt(Step):
    """a * b (broadcasting) in int64, saturated to `dtype` (chosen so that nothing saturates)."""

    a: str
    b: str
    dtype: str = "int32"
    out: str = ""
    unit: str = ""
    kind: ClassVar[str] = "MulInt"

    def inputs(self):
        return (self.a, self.b)

    def emit(self, b):
        product = b.op("Mul", [ops.cast(b, self.a, ops.I64), ops.cast(b, self.b, ops.I64)], "product")
        return ops.saturate(b, product, dtype_of(self.dtype))

    def run(self, env):
        return np_saturate(env[self.a].astype(np.int64) * env[self.b].astype(np.int64), dtype_of(self.dtype))


@dataclass(frozen=True)
class NegInt(Step):
    x: str
    dtype: str
    out: str = ""
    unit: str = ""
    kind: ClassVar[str] = "NegInt"

    def inputs(self):
        return (self.x,)

    def emit(self, b):
        return ops.saturate(b, b.op("Neg", [ops.cast(b, self.x, ops.I64)], "negated"), dtype_of(self.dtype))

    def run(self, env):
        return np_saturate(-env[self.x].astype(np.int64), dtype_of(self.dtype))


@dataclass(frozen=True)
class SliceInt(Step):
    """ONNX Slice with constant parameters and positive steps (Python slicing clamps the same)."""

    x: str
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    axes: tuple[int, ...]
    steps: tuple[int, ...]
    out: str = ""
    unit: str = ""
    kind: ClassVar[str] = "SliceInt"

    def __post_init__(self):
        if any(s <= 0 for s in self.steps):
            raise OptionError("integer Slice takes positive steps only")

    def inputs(self):
        return (self.x,)

    def emit(self, b):
        params = [b.const(np.asarray(v, np.int64), ops.I64, hint)
                  for v, hint in ((self.starts, "starts"), (self.ends, "ends"), (self.axes, "axes"),
                                  (self.steps, "steps"))]
        return b.op("Slice", [self.x, *params], "sliced")

    def run(self, env):
        x = env[self.x]
        index = [slice(None)] * x.ndim
        for start, end, axis, step in zip(self.starts, self.ends, self.axes, self.steps):
            index[axis % x.ndim] = slice(start, end, step)
        return x[tuple(index)]


@dataclass(frozen=True)
class ConcatInt(Step):
    xs: tuple[str, ...]
    axis: int
    dtype: str
    out: str = ""
    unit: str = ""
    kind: ClassVar[str] = "ConcatInt"

    def inputs(self):
        return tuple(self.xs)

    def emit(self, b):
        return b.op("Concat", [ops.cast(b, x, dtype_of(self.dtype)) for x in self.xs], "concatenated", axis=self.axis)

    def run(self, env):
        return np.concatenate([env[x].astype(dtype_of(self.dtype)) for x in self.xs], axis=self.axis)


@dataclass(frozen=True)
class UnsqueezeInt(Step):
    x: str
    axes: tuple[int, ...]
    out: str = ""
    unit: str = ""
    kind: ClassVar[str] = "UnsqueezeInt"

    def inputs(self):
        return (self.x,)

    def emit(self, b):
        return b.op("Unsqueeze", [self.x, b.const(np.asarray(self.axes, np.int64), ops.I64, "axes")], "unsqueezed")

    def run(self, env):
        return np.expand_dims(env[self.x], tuple(self.axes))


@dataclass(frozen=True)
class ExpandInt(Step):
    x: str
    shape: tuple[int, ...]
    out: str = ""
    unit: str = ""
    kind: ClassVar[str] = "ExpandInt"

    def inputs(self):
        return (self.x,)

    def emit(self, b):
        return b.op("Expand", [self.x, b.const(np.asarray(self.shape, np.int64), ops.I64, "shape")], "expanded")

    def run(self, env):
        x = env[self.x]
        return np.array(np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(self.shape))))


@dataclass(frozen=True)
class CausalMask(Step):
    """The additive int32 mask [B or 1, 1, S, T] of the canonical causal (+ padding) bias, from
    the positions: `mask` is the 0/1 attention mask [B, T] (T keys, past + new tokens), `queries`
    a [B, S] input whose dim 1 counts the new tokens (the ids). Query i sits at position
    T - S + i and sees keys j <= T - S + i; with `padding`, also only keys with mask[b, j] == 1.
    Each masked term adds MASK_TERM, as the float bias adds c per term."""

    mask: str
    queries: str
    padding: bool
    out: str = ""
    unit: str = ""
    kind: ClassVar[str] = "CausalMask"

    def inputs(self):
        return (self.mask, self.queries)

    def emit(self, b):
        _declare_input(b, self.mask)
        _declare_input(b, self.queries)
        mask = ops.cast(b, self.mask, ops.I64)
        zero, one = b.const(0, ops.I64, "zero"), b.const(1, ops.I64, "one")
        keys_total = b.op("Gather", [b.op("Shape", [mask], "mask_shape"), one], "keys_total", axis=0)
        new = b.op("Gather", [b.op("Shape", [ops.cast(b, self.queries, ops.I64)], "queries_shape"), one],
                   "queries_total", axis=0)
        keys = b.op("Range", [zero, keys_total, one], "key_positions")
        queries = b.op("Range", [b.op("Sub", [keys_total, new], "past"), keys_total, one], "query_positions")
        allowed = b.op("LessOrEqual", [b.op("Unsqueeze", [keys, b.const([0], ops.I64, "axes")], "keys_row"),
                                       b.op("Unsqueeze", [queries, b.const([1], ops.I64, "axes")], "queries_column")],
                       "causal_allowed")
        blocked = b.op("Sub", [one, ops.cast(b, allowed, ops.I64)], "causal_blocked")
        blocked = b.op("Unsqueeze", [blocked, b.const([0, 1], ops.I64, "axes")], "causal_blocked")
        if self.padding:
            padded = b.op("Sub", [one, b.op("Unsqueeze", [mask, b.const([1, 2], ops.I64, "axes")], "mask4")],
                          "padding_blocked")
            blocked = b.op("Add", [padded, blocked], "blocked_terms")
        additive = b.op("Mul", [blocked, b.const(MASK_TERM, ops.I64, "mask_term")], "additive_mask")
        return ops.saturate(b, additive, np.int32)

    def run(self, env):
        mask = env[self.mask].astype(np.int64)
        total, new = mask.shape[1], env[self.queries].shape[1]
        allowed = np.arange(total)[None, :] <= np.arange(total - new, total)[:, None]
        blocked = (1 - allowed.astype(np.int64))[None, None]
        if self.padding:
            blocked = (1 - mask)[:, None, None, :] + blocked
        return np_saturate(blocked * MASK_TERM, np.dtype(np.int32))


STEPS = (RmsNormInt, SiluInt, MulInt, NegInt, SliceInt, ConcatInt, UnsqueezeInt, ExpandInt, CausalMask)
