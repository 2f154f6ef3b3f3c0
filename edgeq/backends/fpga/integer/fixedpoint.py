"""Compile-time fixed-point math shared by every integer kernel, and the numpy mirrors of the
runtime primitives (shifts, rounding, saturation) that the kernels' references are built from.

Conventions used throughout `edgeq.backends.fpga.integer`:
- a quantized value is `real = int * scale`, symmetric (no zero point);
- a power-of-two scale is written `2^-k`;
- a *dyadic* number is `multiplier / 2^shift` with integer multiplier and shift >= 1, so that
  every requantization is one integer multiply, one add of a rounding constant and one
  arithmetic right shift — never a float;
- every intermediate value is kept below 2^62 in magnitude by construction, so int64 never
  overflows and the numpy references (int64) and ONNX Runtime (int64/uint64) agree bit for bit.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from edgeq.errors import OptionError

# Every intermediate is proven to stay within +-2^62 (headroom for one rounding add).
INT64_BUDGET_BITS = 62
# The widest multiplier a requantization uses: a 32-bit signed hardware multiplier.
MULTIPLIER_BITS = 31


class Rounding(enum.Enum):
    """How a right shift rounds.

    HALF_UP: floor(x / 2^s + 1/2) — one adder before the shift; the FPGA default and what every
    kernel uses internally. HALF_EVEN: ties to even, as ONNX QuantizeLinear rounds; costs a
    mask compare and a parity fix-up.
    """

    HALF_UP = "half_up"
    HALF_EVEN = "half_even"


def pow2_exponent(scale: float) -> int | None:
    """k with scale == 2^-k exactly, or None when scale is not a power of two."""
    if not (scale > 0 and math.isfinite(scale)):
        return None
    mantissa, exponent = math.frexp(scale)  # scale = mantissa * 2^exponent, mantissa in [0.5, 1)
    return 1 - exponent if mantissa == 0.5 else None


def require_pow2(scale: float, what: str) -> int:
    """k with scale == 2^-k, or an OptionError naming the offending scale."""
    k = pow2_exponent(scale)
    if k is None:
        raise OptionError(f"{what} scale {scale!r} is not a power of two",
                          fix="the FPGA target needs scales 2^-k; requantize with a shift first")
    return k


# Kernel inputs are below 2^33 in magnitude (int32, or a difference of int32 sums); a larger
# left shift onto a working grid could leave the int64 budget.
MAX_LEFT_PRESCALE = INT64_BUDGET_BITS - 34


def working_shift(scale: float, anchor: float, grid_bits: int) -> int:
    """Shift p putting `anchor` on the grid scale*2^-p at between 2^grid_bits and 2^(grid_bits+1) steps.

    p > 0 means a left shift of the integer input (a finer grid, exact); p < 0 a right shift
    (the input is finer than the polynomial needs). Fixing the step count makes the polynomial
    constants, and so every intermediate width, independent of the input scale.
    """
    steps = anchor / scale
    p = grid_bits - math.floor(math.log2(steps))
    while steps * 2.0**p < 2**grid_bits:
        p += 1
    while steps * 2.0**p >= 2 ** (grid_bits + 1):
        p -= 1
    if p > MAX_LEFT_PRESCALE:
        raise OptionError(f"input scale {scale!r} is too coarse for an integer polynomial kernel",
                          fix="quantize the input with a finer scale")
    return p


def saturation_limit(out_scale: float, grid_scale: float, at_least: int) -> int:
    """Clamp for an activation's input on `grid_scale` such that clamping changes no int8 output.

    Past 129 output steps an (eventually identity-like) activation saturates anyway, and
    `at_least` covers where its polynomial is still curved; clamping bounds every product after.
    """
    return max(at_least, math.ceil(129 * out_scale / grid_scale))


# Probability outputs (softmax, sigmoid): fraction bits by dtype, i.e. scale 1/256, 1/128, or
# 2^-16 for uint16 (a product takes it as two 8-bit digits, see edgeq.backends.fpga.integer.program.Digit).
PROB_FRAC_BITS = {np.dtype(np.uint8): 8, np.dtype(np.int8): 7, np.dtype(np.uint16): 16}


def probability_frac_bits(out_dtype: np.dtype | type) -> int:
    """Fraction bits of a probability output; raises for dtypes other than uint8/int8/uint16."""
    dtype = np.dtype(out_dtype)
    if dtype not in PROB_FRAC_BITS:
        raise OptionError(f"probability output dtype {dtype} is not supported",
                          fix="use uint8 (1/256), int8 (1/128) or uint16 (2^-16)")
    return PROB_FRAC_BITS[dtype]


@dataclass(frozen=True)
class DyadicAffine:
    """y = round((x * multiplier + bias) / 2^shift), elementwise or per channel (last axis).

    Arrays are int64 with shape () for per-tensor or (C,) for per-channel; `bias` is None when
    absent. `is_pure_shift` marks multiplier == 1 everywhere, i.e. power-of-two requantization.
    """

    multiplier: np.ndarray
    shift: np.ndarray
    bias: np.ndarray | None

    @property
    def is_pure_shift(self) -> bool:
        return bool(np.all(self.multiplier == 1))


def dyadic_affine(real_scale: np.ndarray | float, input_bound: int,
                  real_bias: np.ndarray | float | None = None) -> DyadicAffine:
    """Integer (multiplier, shift, bias) approximating y = x * real_scale + real_bias.

    Chooses, per channel, the largest shift in [1, 62] such that the multiplier fits
    MULTIPLIER_BITS and |x| * |multiplier| + |bias| + rounding stays within 2^62 for
    |x| <= input_bound. An exact power of two (no bias) becomes multiplier 1: a pure shift.
    """
    scale = np.atleast_1d(np.asarray(real_scale, dtype=np.float64))
    bias = None if real_bias is None else np.broadcast_to(np.asarray(real_bias, np.float64), scale.shape)
    if not np.all(np.isfinite(scale)) or (bias is not None and not np.all(np.isfinite(bias))):
        raise OptionError("requantization scale or bias is not finite", fix="check the weights and scales")
    shifts = np.arange(1, INT64_BUDGET_BITS + 1, dtype=np.int64)[:, None]  # (62, 1) candidates
    mult = np.rint(scale[None, :] * np.exp2(shifts))
    worst = float(input_bound) * np.abs(mult) + np.exp2(shifts - 1)
    if bias is not None:
        worst = worst + np.abs(np.rint(bias[None, :] * np.exp2(shifts)))
    fits = (np.abs(mult) < 2.0**MULTIPLIER_BITS) & (worst <= 2.0**INT64_BUDGET_BITS)
    if not np.all(fits.any(axis=0)):
        raise OptionError(f"requantization factor {scale.max()!r} cannot be represented as an "
                          f"integer multiply and shift for inputs up to {input_bound}",
                          fix="use an output scale closer to the input scale")
    best = (INT64_BUDGET_BITS - 1) - np.argmax(fits[::-1], axis=0)  # largest fitting shift index
    shift = best + 1
    mult_chosen = mult[best, np.arange(scale.size)]
    pow2 = np.array([pow2_exponent(float(s)) for s in scale], dtype=object)
    if bias is None and all(k is not None and k >= 1 for k in pow2):
        # Exact powers of two: the shift alone is the requantization (no multiplier at all).
        mult_chosen, shift = np.ones_like(mult_chosen), np.array(pow2, dtype=np.int64)
    shape = np.shape(real_scale)
    as_int = lambda a: np.asarray(a, dtype=np.int64).reshape(shape)  # noqa: E731
    bias_int = None
    if bias is not None:
        bias_int = as_int(np.rint(bias * np.exp2(shift.astype(np.float64))))
    return DyadicAffine(as_int(mult_chosen), as_int(shift), bias_int)


# ---- numpy mirrors of the runtime primitives (int64, arithmetic shifts) ---------------------

def np_shift_right_rounding(x: np.ndarray, shift: np.ndarray | int, rounding: Rounding) -> np.ndarray:
    """round(x / 2^shift) for 0 <= shift <= 62, ties per `rounding`; exact for |x| < 2^62."""
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    half = np.right_shift(np.left_shift(np.int64(1), shift), 1)  # 2^(shift-1), 0 for shift 0
    rounded = np.right_shift(x + half, shift)  # numpy's >> on int64 is an arithmetic (floor) shift
    if rounding is Rounding.HALF_EVEN:
        tie = (np.bitwise_and(x, np.left_shift(np.int64(1), shift) - 1) == half) & (shift > 0)
        rounded = rounded - (tie.astype(np.int64) & rounded & 1)
    return rounded


def np_shift(x: np.ndarray, shift: int) -> np.ndarray:
    """x * 2^shift for shift >= 0, round-half-up x / 2^-shift for shift < 0."""
    x = np.asarray(x, dtype=np.int64)
    if shift >= 0:
        return np.left_shift(x, shift)
    return np_shift_right_rounding(x, -shift, Rounding.HALF_UP)


def np_shift_by(x: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """The numpy mirror of `ops.shift_by`: x * 2^exponent, negative exponents rounding half up."""
    exponent = np.asarray(exponent, np.int64)
    shifted = np.left_shift(np.asarray(x, np.int64), np.maximum(exponent, 0))
    return np_shift_right_rounding(shifted, np.maximum(-exponent, 0), Rounding.HALF_UP)


def encoder_steps(value_bits: int) -> list[int]:
    """Shift amounts 2^j, largest first, of a priority encoder covering value_bits bits."""
    top = 1 << (value_bits.bit_length() - 1)
    return [top >> j for j in range(top.bit_length())]


def np_bit_length(x: np.ndarray, value_bits: int) -> np.ndarray:
    """The numpy mirror of `ops.bit_length` (x >= 0, int64)."""
    rest = np.asarray(x, np.int64)
    length = np.zeros_like(rest)
    for step in encoder_steps(value_bits):
        amount = (rest >= (1 << step)).astype(np.int64) * step
        rest, length = rest >> amount, length + amount
    return length + rest


def np_dyadic(x: np.ndarray, affine: DyadicAffine, rounding: Rounding = Rounding.HALF_UP) -> np.ndarray:
    """The numpy mirror of `ops.dyadic`."""
    acc = np.asarray(x, dtype=np.int64)
    if not affine.is_pure_shift:
        acc = acc * affine.multiplier
    if affine.bias is not None:
        acc = acc + affine.bias
    return np_shift_right_rounding(acc, affine.shift, rounding)


def np_saturate(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Clip to dtype's range, then narrow (ORT's Cast wraps, so the clip is what saturates)."""
    info = np.iinfo(dtype)
    return np.clip(x, info.min, info.max).astype(dtype)


def np_rounding_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """round-half-up(n / d) for n >= 0, d > 0 as floor((2n + d) / 2d)."""
    return (2 * numerator + denominator) // (2 * denominator)
