"""Integer-only sigmoid and SiLU (x * sigmoid(x), the Llama MLP activation).

Approximation (edgeq's choice): reuse I-BERT's i-exp (Kim et al., 2021) on t = |x| and divide,
    sigmoid(x) = one / (one + e)  for x >= 0,   e / (one + e)  for x < 0,   e = i-exp(|x|),
where `one` is i-exp(0). Using exp(-|x|) only keeps every value non-negative and below 2^28, and
the symmetry sigmoid(-x) = 1 - sigmoid(x) holds up to the final rounding. The ratio is one
rounding integer division per element. Error of the approximation before output rounding
(measured with a 2^-30 sigmoid fraction on every working-grid point of |x| < 11): 7.8e-4 on
sigmoid — the polynomial's 0.31% relative error times sigmoid' <= 1/4 — and 7.1e-4 on SiLU.
The outputs add half a step of rounding.

SiLU multiplies x by sigmoid with 16 fraction bits and requantizes to int8 (or int16) with a
power-of-two scale; for a power-of-two input scale that last step is a pure shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import edgeq.backends.fpga.integer.ops as ops
from edgeq.backends.fpga.integer.builder import IntGraphBuilder, QTensor
from edgeq.backends.fpga.integer.fixedpoint import (DyadicAffine, dyadic_affine, np_dyadic, np_rounding_divide, np_saturate,
                                      np_shift, probability_frac_bits, require_pow2, saturation_limit)
from edgeq.backends.fpga.integer.iexp import IExp
from edgeq.errors import OptionError

# SiLU's internal sigmoid precision: 2^-16, far below an int8 output step.
SILU_SIGMOID_FRAC_BITS = 16
SILU_OUT_DTYPE = np.dtype(np.int8)
# int16: a wide output (SwiGLU's product with `up` keeps 16-bit operands; the product's one
# requantization to int8 comes after it).
SILU_OUT_DTYPES = (np.dtype(np.int8), np.dtype(np.int16))
_SATURATION_STEPS = {np.dtype(np.int8): 1, np.dtype(np.int16): 256}   # 129 int8 steps = 129*256 int16 ones


def emit_sigmoid_fraction(b: IntGraphBuilder, exp: IExp, x_w: str, frac_bits: int) -> str:
    """round(sigmoid(x_w * S_w) * 2^frac_bits) for int64 x_w on exp's working grid (int64)."""
    e = ops.cast(b, exp.emit(b, ops.cast(b, b.op("Abs", [x_w], "abs_x"), ops.U64)), ops.I64)
    one = b.const(exp.one, ops.I64, "exp_one")
    non_negative = b.op("GreaterOrEqual", [x_w, b.const(0, ops.I64, "zero")], "x_non_negative")
    numerator = b.op("Where", [non_negative, one, e], "sigmoid_num")
    denominator = b.op("Add", [one, e], "sigmoid_den")
    scaled = b.op("Mul", [numerator, b.const(1 << frac_bits, ops.I64, "sigmoid_unit")], "sigmoid_num_scaled")
    return ops.rounding_divide(b, scaled, denominator)


def np_sigmoid_fraction(exp: IExp, x_w: np.ndarray, frac_bits: int) -> np.ndarray:
    """numpy mirror of `emit_sigmoid_fraction`."""
    e = exp.reference(np.abs(x_w))
    numerator = np.where(x_w >= 0, exp.one, e)
    return np_rounding_divide(numerator * (1 << frac_bits), exp.one + e)


@dataclass(frozen=True)
class Sigmoid:
    """Sigmoid of an integer input with scale `in_scale`; output 1/256 (uint8) or 1/128 (int8)."""

    exp: IExp
    out_dtype: np.dtype
    frac_bits: int

    @classmethod
    def plan(cls, in_scale: float, out_dtype: np.dtype | type = np.uint8) -> Sigmoid:
        return cls(IExp.for_scale(in_scale), np.dtype(out_dtype), probability_frac_bits(out_dtype))

    @property
    def out_scale(self) -> float:
        return 2.0**-self.frac_bits

    def emit(self, b: IntGraphBuilder, x: QTensor) -> QTensor:
        with b.scope("sigmoid"):
            x_w = ops.load(b, x, self.exp.prescale)
            out = ops.saturate(b, emit_sigmoid_fraction(b, self.exp, x_w, self.frac_bits), self.out_dtype)
        return QTensor(out, self.out_dtype, self.out_scale)

    def reference(self, x: np.ndarray) -> np.ndarray:
        x_w = np_shift(np.asarray(x, np.int64), self.exp.prescale)
        return np_saturate(np_sigmoid_fraction(self.exp, x_w, self.frac_bits), self.out_dtype)


@dataclass(frozen=True)
class Silu:
    """SiLU of an integer input with scale `in_scale`, to int8 (or int16) with scale `out_scale` (2^-f)."""

    exp: IExp
    limit: int           # clamp of x on the working grid (beyond it the output saturates or is 0)
    requant: DyadicAffine
    out_scale: float
    out_dtype: np.dtype = SILU_OUT_DTYPE

    @classmethod
    def plan(cls, in_scale: float, out_scale: float, out_dtype: np.dtype | type = SILU_OUT_DTYPE) -> Silu:
        out_dtype = np.dtype(out_dtype)
        if out_dtype not in SILU_OUT_DTYPES:
            raise OptionError(f"SiLU output dtype {out_dtype} must be int8 or int16")
        require_pow2(out_scale, "SiLU output")
        exp = IExp.for_scale(in_scale)
        limit = saturation_limit(out_scale * _SATURATION_STEPS[out_dtype], exp.grid_scale, at_least=exp.t_limit)
        real = exp.grid_scale * 2.0**-SILU_SIGMOID_FRAC_BITS / out_scale
        return cls(exp, limit, dyadic_affine(real, input_bound=limit << SILU_SIGMOID_FRAC_BITS), out_scale, out_dtype)

    def emit(self, b: IntGraphBuilder, x: QTensor) -> QTensor:
        with b.scope("silu"):
            x_w = ops.clamp(b, ops.load(b, x, self.exp.prescale), -self.limit, self.limit)
            sigmoid = emit_sigmoid_fraction(b, self.exp, x_w, SILU_SIGMOID_FRAC_BITS)
            product = b.op("Mul", [x_w, sigmoid], "x_times_sigmoid")
            out = ops.saturate(b, ops.dyadic(b, product, self.requant), self.out_dtype)
        return QTensor(out, self.out_dtype, self.out_scale)

    def reference(self, x: np.ndarray) -> np.ndarray:
        x_w = np.clip(np_shift(np.asarray(x, np.int64), self.exp.prescale), -self.limit, self.limit)
        product = x_w * np_sigmoid_fraction(self.exp, x_w, SILU_SIGMOID_FRAC_BITS)
        return np_saturate(np_dyadic(product, self.requant), self.out_dtype)


def emit_sigmoid(b: IntGraphBuilder, x: QTensor, *, out_dtype: np.dtype | type = np.uint8) -> QTensor:
    """Append an integer sigmoid of x; output scale 1/256 (uint8) or 1/128 (int8)."""
    return Sigmoid.plan(x.scale, out_dtype).emit(b, x)


def sigmoid_reference(x: np.ndarray, scale: float, *, out_dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """Bit-exact numpy model of `emit_sigmoid`."""
    return Sigmoid.plan(scale, out_dtype).reference(x)


def emit_silu(b: IntGraphBuilder, x: QTensor, *, out_scale: float) -> QTensor:
    """Append an integer SiLU of x; int8 output with power-of-two `out_scale`."""
    return Silu.plan(x.scale, out_scale).emit(b, x)


def silu_reference(x: np.ndarray, scale: float, *, out_scale: float) -> np.ndarray:
    """Bit-exact numpy model of `emit_silu`."""
    return Silu.plan(scale, out_scale).reference(x)
