"""Requantization of an integer accumulator (what follows every integer MatMul): int32 with
scale s_in (per tensor, or per output channel on the last axis) to a narrow type with a
power-of-two scale, saturating.

Two modes:
- dyadic: y = round(x * M / 2^s), M < 2^31 — any ratio s_in/s_out, one multiply and one shift;
- shift-only: the ratio must be a power of two, y = round(x / 2^s) (or x * 2^-s when the output
  grid is finer) — what the FPGA target uses between layers.
Rounding is HALF_UP (add 2^(s-1), shift) by default; HALF_EVEN matches QuantizeLinear.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeq.errors import OptionError
import edgeq.backends.fpga.integer.ops as ops
from edgeq.backends.fpga.integer.builder import IO_DTYPES, IntGraphBuilder, QTensor
from edgeq.backends.fpga.integer.fixedpoint import (DyadicAffine, Rounding, dyadic_affine, np_dyadic, np_saturate,
                                      pow2_exponent)


@dataclass(frozen=True)
class Requantize:
    """x (scale in_scale[*channel_scale]) -> out_dtype with scale out_scale.

    `left_shift` > 0 only in shift-only mode when the output grid is finer than the input's
    (then `affine` is None); otherwise `affine` holds the multiply/shift.
    """

    affine: DyadicAffine | None
    left_shift: int
    out_dtype: np.dtype
    out_scale: float
    rounding: Rounding

    @classmethod
    def plan(cls, in_scale: float, out_scale: float, *, out_dtype: np.dtype | type = np.int8,
             rounding: Rounding = Rounding.HALF_UP, shift_only: bool = False,
             channel_scale: np.ndarray | None = None, in_dtype: np.dtype | type = np.int32) -> Requantize:
        out_dtype = np.dtype(out_dtype)
        if out_dtype not in IO_DTYPES:
            raise OptionError(f"requantization output dtype {out_dtype} is not supported")
        ratio = in_scale / out_scale * (np.ones(()) if channel_scale is None else np.asarray(channel_scale, np.float64))
        if not (np.all(ratio > 0) and np.all(np.isfinite(ratio))):
            raise OptionError("requantization scales must be positive and finite")
        input_bound = 1 << (np.iinfo(in_dtype).bits - 1)
        if not shift_only:
            return cls(dyadic_affine(ratio, input_bound), 0, out_dtype, out_scale, rounding)
        exponents = [pow2_exponent(float(r)) for r in np.ravel(ratio)]
        if any(k is None for k in exponents):
            raise OptionError(f"shift-only requantization needs power-of-two scale ratios, got {np.ravel(ratio)[:4]}",
                              fix="use power-of-two scales or the dyadic mode")
        shifts = np.array(exponents, dtype=np.int64).reshape(np.shape(ratio))
        if np.all(shifts >= 1):
            return cls(DyadicAffine(np.ones_like(shifts), shifts, None), 0, out_dtype, out_scale, rounding)
        if np.all(shifts == shifts.flat[0]) and -31 <= shifts.flat[0] <= 0:  # int32 << 31 fits int64
            return cls(None, int(-shifts.flat[0]), out_dtype, out_scale, rounding)
        raise OptionError("shift-only requantization cannot mix left and right shifts across channels",
                          fix="use the dyadic mode")

    def emit(self, b: IntGraphBuilder, x: QTensor) -> QTensor:
        with b.scope("requant"):
            acc = ops.load(b, x)
            if self.affine is None:
                acc = ops.shift_left(b, acc, self.left_shift)
            else:
                acc = ops.dyadic(b, acc, self.affine, self.rounding)
            out = ops.saturate(b, acc, self.out_dtype)
        return QTensor(out, self.out_dtype, self.out_scale)

    def reference(self, x: np.ndarray) -> np.ndarray:
        acc = np.asarray(x, np.int64)
        if self.affine is None:
            acc = np.left_shift(acc, self.left_shift)
        else:
            acc = np_dyadic(acc, self.affine, self.rounding)
        return np_saturate(acc, self.out_dtype)


def emit_requantize(b: IntGraphBuilder, x: QTensor, out_scale: float, *, out_dtype: np.dtype | type = np.int8,
                    rounding: Rounding = Rounding.HALF_UP, shift_only: bool = False,
                    channel_scale: np.ndarray | None = None) -> QTensor:
    """Append requantization of x to (out_dtype, out_scale); see `Requantize.plan`."""
    return Requantize.plan(x.scale, out_scale, out_dtype=out_dtype, rounding=rounding, shift_only=shift_only,
                           channel_scale=channel_scale, in_dtype=x.dtype).emit(b, x)


def requantize_reference(x: np.ndarray, in_scale: float, out_scale: float, *, out_dtype: np.dtype | type = np.int8,
                         rounding: Rounding = Rounding.HALF_UP, shift_only: bool = False,
                         channel_scale: np.ndarray | None = None) -> np.ndarray:
    """Bit-exact numpy model of `emit_requantize`."""
    return Requantize.plan(in_scale, out_scale, out_dtype=out_dtype, rounding=rounding, shift_only=shift_only,
                           channel_scale=channel_scale, in_dtype=np.asarray(x).dtype).reference(x)
