"""Runtime primitives every kernel is built from, emitted as standard ONNX nodes.

Each one has a numpy mirror in `fixedpoint` (np_*) with identical results. ONNX Runtime facts
they rest on (tests/integer/test_ort_quirks.py pins them):
- BitShift exists only for unsigned types, so a signed shift goes through uint64;
- Cast between integer types wraps (no saturation), so saturation is an explicit Clip;
- integer Div truncates toward zero, so it is only ever used on non-negative operands;
- Where has no uint64 kernel and ReduceSum none for uint64, so selects and sums run in int64.
"""

from __future__ import annotations

import numpy as np

from edgeq.backends.fpga.integer.builder import IntGraphBuilder, QTensor, onnx_type
from edgeq.backends.fpga.integer.fixedpoint import DyadicAffine, Rounding, encoder_steps

I64 = np.dtype(np.int64)
U64 = np.dtype(np.uint64)
_SIGN_BIT = np.uint64(1 << 63)


def cast(b: IntGraphBuilder, x: str, dtype: np.dtype | type) -> str:
    dtype = np.dtype(dtype)
    if b.dtype(x) == dtype:
        return x
    return b.op("Cast", [x], "cast", to=onnx_type(dtype))


def load(b: IntGraphBuilder, x: QTensor, prescale: int = 0) -> str:
    """A kernel's input as int64 on its working grid: x * 2^prescale (rounding when negative)."""
    return shift(b, cast(b, b.declare(x), I64), prescale)


# A shift amount: static (an int, or an array per last-axis channel) or dynamic (the name of a
# uint64 tensor broadcastable against the shifted value).
Amount = int | np.ndarray | str


def _amount(b: IntGraphBuilder, shift: Amount) -> str:
    return shift if isinstance(shift, str) else b.const(np.asarray(shift, np.int64), U64, "shift_amount")


def shift_left(b: IntGraphBuilder, x: str, shift: Amount) -> str:
    """x * 2^shift (caller guarantees no overflow). Two's complement makes the uint64 shift
    of a reinterpreted int64 exact for negative values too."""
    if isinstance(shift, int) and shift == 0:
        return x
    dtype = b.dtype(x)
    shifted = b.op("BitShift", [cast(b, x, U64), _amount(b, shift)], "shl", direction="LEFT")
    return cast(b, shifted, dtype)


def shift_right_floor(b: IntGraphBuilder, x: str, shift: Amount) -> str:
    """floor(x / 2^shift) for 0 <= shift <= 62.

    uint64 input: one BitShift. int64 input: bias by 2^63 (flip the sign bit, in uint64) so the
    value is non-negative, shift logically, subtract the shifted bias 2^63 >> shift (wrapping
    uint64 arithmetic) and reinterpret: exact for every int64 value and every amount.
    """
    amount = _amount(b, shift)
    if b.dtype(x) == U64:
        return b.op("BitShift", [x, amount], "shr", direction="RIGHT")
    sign_bit = b.const(_SIGN_BIT, U64, "sign_bit")
    biased = b.op("Add", [cast(b, x, U64), sign_bit], "biased")
    shifted = b.op("BitShift", [biased, amount], "shr", direction="RIGHT")
    if isinstance(shift, str):
        unbias = b.op("BitShift", [sign_bit, amount], "shr_unbias", direction="RIGHT")
    else:
        unbias = b.const(np.right_shift(_SIGN_BIT, np.asarray(shift, np.uint64)), U64, "shr_unbias")
    return cast(b, b.op("Sub", [shifted, unbias], "floor_shr"), I64)


def _half(b: IntGraphBuilder, shift: Amount, dtype: np.dtype) -> str:
    """2^(shift-1), or 0 for shift 0: the round-half-up constant."""
    if not isinstance(shift, str):
        return b.const(np.right_shift(np.left_shift(np.int64(1), np.asarray(shift, np.int64)), 1), dtype, "half")
    one = b.const(1, U64, "one")
    half = b.op("BitShift", [b.op("BitShift", [one, shift], "pow2", direction="LEFT"), one], "half",
                direction="RIGHT")
    return cast(b, half, dtype)


def shift_right_rounding(b: IntGraphBuilder, x: str, shift: Amount, rounding: Rounding = Rounding.HALF_UP) -> str:
    """round(x / 2^shift), ties per `rounding` (HALF_EVEN needs a static shift >= 1);
    mirrors fixedpoint.np_shift_right_rounding."""
    dtype = b.dtype(x)
    rounded = shift_right_floor(b, b.op("Add", [x, _half(b, shift, dtype)], "plus_half"), shift)
    if rounding is Rounding.HALF_UP:
        return rounded
    assert not isinstance(shift, str) and np.all(np.asarray(shift) >= 1), "HALF_EVEN takes static shifts >= 1"
    # Ties (remainder exactly one half) went up; step back when that landed on an odd value.
    shift = np.asarray(shift, dtype=np.int64)
    x64, rounded = cast(b, x, I64), cast(b, rounded, I64)
    remainder = b.op("BitwiseAnd", [x64, b.const(np.left_shift(np.int64(1), shift) - 1, I64, "low_mask")], "rem")
    tie = cast(b, b.op("Equal", [remainder, _half(b, shift, I64)], "is_tie"), I64)
    odd = b.op("BitwiseAnd", [rounded, b.const(1, I64, "one")], "is_odd")
    fixed = b.op("Sub", [rounded, b.op("BitwiseAnd", [tie, odd], "tie_and_odd")], "half_even")
    return cast(b, fixed, dtype)


def shift_by(b: IntGraphBuilder, x: str, exponent: str) -> str:
    """x * 2^exponent for an int64 tensor of signed exponents: a left shift where positive, a
    round-half-up right shift where negative (fixedpoint.np_shift_by)."""
    zero = b.const(0, I64, "zero")
    left = cast(b, b.op("Max", [exponent, zero], "left_amount"), U64)
    right = cast(b, b.op("Max", [b.op("Neg", [exponent], "neg_exponent"), zero], "right_amount"), U64)
    return shift_right_rounding(b, shift_left(b, x, left), right)


def bit_length(b: IntGraphBuilder, x: str, value_bits: int) -> str:
    """Bits needed for unsigned x < 2^value_bits (0 for 0): a compare-and-shift priority encoder
    of log2(value_bits) stages, in x's dtype (fixedpoint.np_bit_length)."""
    dtype = b.dtype(x)
    rest, length = x, None
    for step in encoder_steps(value_bits):
        is_wide = b.op("GreaterOrEqual", [rest, b.const(1 << step, dtype, "pow2")], "is_wide")
        amount = b.op("Mul", [cast(b, is_wide, dtype), b.const(step, dtype, "step")], "shift_amount")
        rest = b.op("BitShift", [rest, amount], "rest", direction="RIGHT")
        length = amount if length is None else b.op("Add", [length, amount], "bit_length")
    return b.op("Add", [length, rest], "bit_length")  # rest is now 0 or 1


def shift(b: IntGraphBuilder, x: str, amount: int) -> str:
    """x * 2^amount for amount >= 0, round-half-up x / 2^-amount otherwise (fixedpoint.np_shift)."""
    if amount >= 0:
        return shift_left(b, x, amount)
    return shift_right_rounding(b, x, -amount)


def dyadic(b: IntGraphBuilder, x: str, affine: DyadicAffine, rounding: Rounding = Rounding.HALF_UP) -> str:
    """round((x * multiplier + bias) / 2^shift) in int64 (fixedpoint.np_dyadic)."""
    acc = cast(b, x, I64)
    if not affine.is_pure_shift:
        acc = b.op("Mul", [acc, b.const(affine.multiplier, I64, "multiplier")], "scaled")
    if affine.bias is not None:
        acc = b.op("Add", [acc, b.const(affine.bias, I64, "bias")], "biased_acc")
    return shift_right_rounding(b, acc, affine.shift, rounding)


def saturate(b: IntGraphBuilder, x: str, dtype: np.dtype | type) -> str:
    """Clip to dtype's range then narrow (fixedpoint.np_saturate)."""
    info = np.iinfo(dtype)
    source = b.dtype(x)
    low = max(info.min, np.iinfo(source).min)
    clipped = b.op("Clip", [x, b.const(low, source, "sat_min"), b.const(info.max, source, "sat_max")], "saturated")
    return cast(b, clipped, dtype)


def clamp(b: IntGraphBuilder, x: str, low: int, high: int) -> str:
    dtype = b.dtype(x)
    return b.op("Clip", [x, b.const(low, dtype, "clamp_min"), b.const(high, dtype, "clamp_max")], "clamped")


def rounding_divide(b: IntGraphBuilder, numerator: str, denominator: str) -> str:
    """round-half-up(n / d) for n >= 0, d > 0, as floor((2n + d) / 2d) (fixedpoint.np_rounding_divide)."""
    two = b.const(2, b.dtype(numerator), "two")
    top = b.op("Add", [b.op("Mul", [numerator, two], "twice_num"), denominator], "num_plus_half")
    return b.op("Div", [top, b.op("Mul", [denominator, two], "twice_den")], "rounded_quotient")


def reduce_last(b: IntGraphBuilder, op_type: str, x: str) -> str:
    """ReduceSum/ReduceMax over the last axis, keeping it (for broadcasting back)."""
    return b.op(op_type, [x, b.const([-1], I64, "last_axis")], op_type.lower(), keepdims=1)


__all__ = ["cast", "load", "shift_left", "shift_right_floor", "shift_right_rounding", "shift", "shift_by", "bit_length",
           "dyadic", "saturate", "clamp", "rounding_divide", "reduce_last", "I64", "U64"]
