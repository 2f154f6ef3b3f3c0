"""Integer-only GELU, I-BERT's i-GELU (Kim et al., 2021, "Integer-only GELU").

GELU(x) = x/2 (1 + erf(x/sqrt2)), and I-BERT approximates
    erf(u) ~= sgn(u) [a (min(|u|, -b) + b)^2 + 1],   a = -0.2888, b = -1.769.
On the working grid S_w (u = x/sqrt2 has the same integer with scale S_e = S_w/sqrt2) with
B = ceil(-b/S_e) and C = ceil(-1/(a S_e^2)) (I-BERT's floor(b/S), floor(1/(a S^2)), negated):
    1 + erf = H * |a| S_e^2,  H = 2C - D for x >= 0 and H = D for x < 0,  D = (B - min(|x|, B))^2
(C doubles as the "1" of 1 + erf, exactly as I-BERT's shift_int = floor(1/S_erf)), so
    GELU = x * H * |a| S_w^3 / 4,
and one dyadic multiply-and-shift maps x*H to the int8 output grid 2^-f.

Widths: x is first moved to a grid where B has 2^11..2^12 steps and clamped to where the output
saturates anyway (|x| <= max(B, 129 * 2^-f / S_w)); H <= 2C < 2^25.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgeq.errors import OptionError
import edgeq.backends.fpga.integer.ops as ops
from edgeq.backends.fpga.integer.builder import IntGraphBuilder, QTensor
from edgeq.backends.fpga.integer.fixedpoint import (DyadicAffine, dyadic_affine, np_dyadic, np_saturate, np_shift,
                                      require_pow2, saturation_limit, working_shift)

# I-BERT (Kim et al., 2021), i-erf: erf(u) ~= sgn(u)[a(min(|u|, -b) + b)^2 + 1].
ERF_A, ERF_B = -0.2888, -1.769
GRID_BITS = 11
OUT_DTYPE = np.dtype(np.int8)
# int16: a wide output that an integer transform (edgeq.backends.fpga.integer.program.HadamardInt) reads
# before the one requantization to the int8 input of the next linear layer.
OUT_DTYPES = (np.dtype(np.int8), np.dtype(np.int16))
_SATURATION_STEPS = {np.dtype(np.int8): 1, np.dtype(np.int16): 256}   # 129 int8 steps = 129*256 int16 ones


@dataclass(frozen=True)
class Gelu:
    """i-GELU from an integer input of scale `in_scale` to int8 with scale `out_scale` (2^-f), or
    with one power-of-two scale per last-axis channel (the requantization is per channel)."""

    prescale: int
    clip_int: int        # B: |x| where the erf polynomial reaches 1
    one_int: int         # C: 1/(|a| S_e^2), the polynomial's "1"
    limit: int           # clamp of x on the working grid
    requant: DyadicAffine
    out_scale: float | np.ndarray  # per tensor, or per last-axis channel (each a power of two)
    out_dtype: np.dtype = OUT_DTYPE

    @classmethod
    def plan(cls, in_scale: float, out_scale: float | np.ndarray, out_dtype: np.dtype | type = OUT_DTYPE) -> Gelu:
        out_dtype = np.dtype(out_dtype)
        if out_dtype not in OUT_DTYPES:
            raise OptionError(f"GELU output dtype {out_dtype} must be int8 or int16")
        scales = np.atleast_1d(np.asarray(out_scale, np.float64))
        for scale in scales:
            require_pow2(float(scale), "GELU output")
        coarsest = float(scales.max())  # the clamp that changes no output of any channel
        prescale = working_shift(in_scale, -ERF_B * math.sqrt(2.0), GRID_BITS)
        grid = in_scale * 2.0**-prescale
        erf_scale = grid / math.sqrt(2.0)
        clip_int = -math.floor(ERF_B / erf_scale)
        one_int = -math.floor(1.0 / (ERF_A * erf_scale**2))
        limit = saturation_limit(coarsest * _SATURATION_STEPS[out_dtype], grid, at_least=clip_int)
        if limit > 1 << 28:
            raise OptionError(f"GELU output scale {out_scale!r} is too coarse for input scale {in_scale!r}")
        requant = dyadic_affine(-ERF_A * grid**3 / 4.0 / np.asarray(out_scale, np.float64),
                                input_bound=limit * 2 * one_int)
        return cls(prescale, clip_int, one_int, limit, requant, out_scale, out_dtype)

    def emit(self, b: IntGraphBuilder, x: QTensor) -> QTensor:
        with b.scope("gelu"):
            x_w = ops.clamp(b, ops.load(b, x, self.prescale), -self.limit, self.limit)
            clip = b.const(self.clip_int, ops.I64, "erf_clip")
            gap = b.op("Sub", [clip, b.op("Min", [b.op("Abs", [x_w], "abs_x"), clip], "abs_clip")], "erf_gap")
            square = b.op("Mul", [gap, gap], "erf_square")
            upper = b.op("Sub", [b.const(2 * self.one_int, ops.I64, "two_one"), square], "one_plus_erf_pos")
            non_negative = b.op("GreaterOrEqual", [x_w, b.const(0, ops.I64, "zero")], "x_non_negative")
            one_plus_erf = b.op("Where", [non_negative, upper, square], "one_plus_erf")
            product = b.op("Mul", [x_w, one_plus_erf], "x_times_one_plus_erf")
            out = ops.saturate(b, ops.dyadic(b, product, self.requant), self.out_dtype)
        # Per-channel output scales: the QTensor carries the coarsest; channel c is out_scale[c].
        return QTensor(out, self.out_dtype, float(np.max(self.out_scale)))

    def reference(self, x: np.ndarray) -> np.ndarray:
        x_w = np.clip(np_shift(np.asarray(x, np.int64), self.prescale), -self.limit, self.limit)
        square = (self.clip_int - np.minimum(np.abs(x_w), self.clip_int)) ** 2
        one_plus_erf = np.where(x_w >= 0, 2 * self.one_int - square, square)
        return np_saturate(np_dyadic(x_w * one_plus_erf, self.requant), self.out_dtype)


def emit_gelu(b: IntGraphBuilder, x: QTensor, *, out_scale: float) -> QTensor:
    """Append i-GELU of x; int8 output with power-of-two `out_scale`."""
    return Gelu.plan(x.scale, out_scale).emit(b, x)


def gelu_reference(x: np.ndarray, scale: float, *, out_scale: float) -> np.ndarray:
    """Bit-exact numpy model of `emit_gelu`."""
    return Gelu.plan(scale, out_scale).reference(x)
