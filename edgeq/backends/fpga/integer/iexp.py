"""I-BERT's integer exponential (i-exp) of a non-positive argument, shared by softmax and
sigmoid/SiLU.

For an integer t >= 0 on a grid of scale S, exp(-t*S) = 2^-q * exp(-r*S) with t = q*z + r,
z = ceil(ln2 / S) and 0 <= r < z (range reduction by ln 2). On (-ln2, 0] the exponential is the
second-order polynomial L(p) = a(p + b)^2 + c of I-BERT (Kim et al., 2021, "Integer-only
Softmax"), whose
integer form is (b_int - r)^2 + c_int in units of a*S^2; 2^-q is a right shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import edgeq.backends.fpga.integer.ops as ops
from edgeq.backends.fpga.integer.builder import IntGraphBuilder
from edgeq.backends.fpga.integer.fixedpoint import working_shift

# I-BERT (Kim et al., 2021), i-exp: exp(p) ~= 0.3585 (p + 1.353)^2 + 0.344 on (-ln2, 0].
IEXP_A, IEXP_B, IEXP_C = 0.3585, 1.353, 0.344
LN2 = math.log(2.0)
# ln2 spans [2^11, 2^12) steps of the working grid: the polynomial value stays below 2^27 and
# the grid error (<= 1 step in ln2) stays near 1e-4 relative.
GRID_BITS = 11


@dataclass(frozen=True)
class IExp:
    """Constants of i-exp for a caller grid of scale `in_scale` (I-BERT's folding of S)."""

    in_scale: float
    prescale: int       # shift from the caller's grid to the working grid (ops.shift semantics)
    grid_scale: float   # S_w = in_scale * 2^-prescale
    ln2_steps: int      # z = ceil(ln2/S_w)      (I-BERT: x0_int = floor(-ln2/S))
    b_int: int          # floor(b/S_w)            (I-BERT: floor(b/S))
    c_int: int          # floor(c/(a S_w^2))      (I-BERT: floor(c/(a S^2)))

    @classmethod
    def for_scale(cls, in_scale: float) -> IExp:
        prescale = working_shift(in_scale, LN2, GRID_BITS)
        grid = in_scale * 2.0**-prescale
        return cls(in_scale, prescale, grid, math.ceil(LN2 / grid), math.floor(IEXP_B / grid),
                   math.floor(IEXP_C / (IEXP_A * grid * grid)))

    @property
    def one(self) -> int:
        """exp(0) in output units: the largest value i-exp returns (< 2^27)."""
        return self.b_int**2 + self.c_int

    @property
    def max_quotient(self) -> int:
        """Range-reduction quotient at which the shifted polynomial is exactly 0."""
        return self.one.bit_length()

    @property
    def t_limit(self) -> int:
        """Saturation of t: beyond it exp is 0 anyway, and the shift amount stays below 64."""
        return self.max_quotient * self.ln2_steps

    @property
    def unit(self) -> float:
        """Real value of one integer step of i-exp's output: a * S_w^2."""
        return IEXP_A * self.grid_scale**2

    def emit(self, b: IntGraphBuilder, t: str) -> str:
        """exp(-t * S_w) for uint64 t >= 0 already on the working grid; uint64 result."""
        t = b.op("Min", [t, b.const(self.t_limit, ops.U64, "exp_t_limit")], "exp_t")
        z = b.const(self.ln2_steps, ops.U64, "ln2_steps")
        quotient = b.op("Div", [t, z], "exp_q")
        remainder = b.op("Sub", [t, b.op("Mul", [quotient, z], "exp_qz")], "exp_r")
        base = b.op("Sub", [b.const(self.b_int, ops.U64, "exp_b"), remainder], "exp_b_minus_r")
        poly = b.op("Add", [b.op("Mul", [base, base], "exp_sq"), b.const(self.c_int, ops.U64, "exp_c")], "exp_poly")
        return b.op("BitShift", [poly, quotient], "exp", direction="RIGHT")

    def reference(self, t: np.ndarray) -> np.ndarray:
        """numpy mirror of `emit` (int64 in and out)."""
        t = np.minimum(np.asarray(t, np.int64), self.t_limit)
        quotient, remainder = np.divmod(t, self.ln2_steps)
        base = self.b_int - remainder
        return np.right_shift(base * base + self.c_int, quotient)
