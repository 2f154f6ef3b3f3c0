"""Prices of elementwise and row-wise units (softmax, GELU, LayerNorm, RMSNorm, SiLU, residual add, ...).

Both templates build these units as SIMD datapaths of `lanes` lanes, one element per lane per
cycle. A unit makes `passes` passes over each row; passes are either sequential (softmax: find
the max, then exp and sum, then scale — FQ-BERT Sec. III-B) or pipeline stages over successive
rows (LayerNorm: FQ-BERT's "coarse-grained 3-stage pipelined SIMD unit").

Per-lane LUT/FF/DSP counts are architecture counts for an 8-bit datapath, not fitted to any
measurement: an n-bit adder or comparator is n LUTs on the carry chain; a 256-entry x 8-bit table
(FQ-BERT quantizes exp() to 8 bits, "only 256 sampling points are needed") is 2 Kbit of LUTRAM =
32 LUT6 used as 64x1 RAM; every multiplication is one DSP slice. Units with wider inputs are
still priced as 8-bit units, and the estimators say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgeq.backends.fpga.errors import UnpricedOpError
from edgeq.backends.fpga.layers import NonlinearUnit
from edgeq.backends.fpga.primitives import Resources

_TABLE_LUTS = 32  # 256 x 8-bit lookup table in LUTRAM (64 bits per LUT6)
HADAMARD_STAGES = 9  # log2 of the largest online Hadamard block (lowering.rotation.HADAMARD_MAX_BLOCK)


@dataclass(frozen=True)
class UnitPrice:
    """How one lane of a unit is built and how many passes it makes over a row."""

    op: str
    passes: int
    pipelined: bool  # passes are stages over successive rows (throughput one row per pass)
    row_buffered: bool  # first output needs the whole input row
    lut_per_lane: int
    ff_per_lane: int
    dsp_per_lane: int
    rationale: str


def _table(op: str, what: str) -> UnitPrice:
    return UnitPrice(op, 1, False, False, _TABLE_LUTS + 8, 16, 0,
                     f"{what} as a 256-entry 8-bit lookup table (32 LUTRAM LUTs) + 8-bit register")


def _adder(op: str, what: str) -> UnitPrice:
    return UnitPrice(op, 1, False, False, 9, 9, 0, f"{what}: one 9-bit adder/comparator per lane")


PRICES: dict[str, UnitPrice] = {
    "softmax": UnitPrice(
        "softmax", 3, False, True, 8 + 8 + _TABLE_LUTS + 16, 48, 1,
        "3 passes per row (max; exp via 256-entry table and sum; scale by 1/sum) as in FQ-BERT "
        "Sec. III-B; per lane: 8-bit max comparator, 8-bit subtract, exp table, 16-bit sum, "
        "one DSP multiply by the row's reciprocal"),
    "layernorm": UnitPrice(
        "layernorm", 3, True, True, 16 + 8 + 24, 64, 3,
        "3 pipelined stages (mean; variance; normalize) as FQ-BERT's LN core; per lane: 16-bit "
        "sum, 8-bit subtract, 24-bit variance sum, DSPs for x^2, x*rstd, *gamma"),
    "residual_layernorm": UnitPrice(
        "residual_layernorm", 3, True, True, 16 + 16 + 8 + 24, 80, 5,
        "LayerNorm with the residual add fused in stage 1 (FQ-BERT: 'consumes two input vectors "
        "with two scaling factors'): 2 more DSPs per lane for the two rescalings"),
    "hadamard": UnitPrice(
        "hadamard", 1, False, True, HADAMARD_STAGES * 24 + 16, HADAMARD_STAGES * 24, 0,
        f"online Walsh-Hadamard transform (edgeq lower-to-integer): {HADAMARD_STAGES} butterfly stages (blocks "
        "up to 512 channels) of 24-bit add/subtract per lane, each stage's pipeline register per lane, then "
        "the shift to int8 (16 LUTs); no multiplier; the stages' pairing delay lines (block - 1 words "
        "per unit) are taken as the row buffer"),
    "rmsnorm": UnitPrice(
        "rmsnorm", 2, True, True, 24 + 8, 48, 3,
        "RMSNorm (edgeq lower-to-integer's integer RMSNorm): the layernorm unit above (FQ-BERT's LN core) "
        "without its mean stage, so 2 pipelined stages (sum of squares; normalize) instead of 3; per lane: "
        "24-bit square sum, 8-bit output rounding, DSPs for x^2, x*rstd and *gamma (gamma is priced even where "
        "the lowering folds it into the next linear's weights: an upper bound)"),
    "silu": UnitPrice(
        "silu", 1, False, False, _TABLE_LUTS + 8 + 16, 32, 1,
        "SiLU = x * sigmoid(x) (edgeq assumption, no published FPGA unit to copy): sigmoid as the 256-entry "
        "8-bit table of the sigmoid unit, one DSP for the product with x, a 16-bit output register (SwiGLU's "
        "16-bit operand)"),
    "neg": _adder("neg", "negate (0 - x, rotary's rotate_half)"),
    "gelu": _table("gelu", "GELU"),
    "erf": _table("erf", "erf"),
    "exp": _table("exp", "exp"),
    "tanh": _table("tanh", "tanh"),
    "sigmoid": _table("sigmoid", "sigmoid"),
    "sqrt": _table("sqrt", "sqrt"),
    "reciprocal": _table("reciprocal", "reciprocal"),
    "pow": _table("pow", "pow with a constant exponent"),
    "add": _adder("add", "add"),
    "sub": _adder("sub", "subtract"),
    "max": _adder("max", "max"),
    "min": _adder("min", "min"),
    "relu": UnitPrice("relu", 1, False, False, 8, 8, 0, "ReLU: 8-bit sign mux per lane"),
    "clip": UnitPrice("clip", 1, False, False, 16, 8, 0, "Clip: two 8-bit comparators per lane"),
    "mul": UnitPrice("mul", 1, False, False, 0, 16, 1, "multiply: one DSP per lane (an 8x8 or 16x16 product: "
                     "one DSP48 takes 27x18 or 25x18 bits; SwiGLU's and rotary's elementwise products)"),
    "div": UnitPrice("div", 1, False, False, _TABLE_LUTS + 8, 24, 1,
                     "divide: reciprocal table then one DSP multiply per lane"),
    "reduce_mean": UnitPrice("reduce_mean", 1, False, True, 16, 16, 0,
                             "row sum (16-bit adder per lane); the 1/n scale is a shift or folded"),
    "reduce_sum": UnitPrice("reduce_sum", 1, False, True, 16, 16, 0,
                            "row sum: 16-bit adder per lane"),
    "reduce_max": UnitPrice("reduce_max", 1, False, True, 8, 8, 0,
                            "row max: 8-bit comparator per lane"),
    "dynamic_quantize": UnitPrice(
        "dynamic_quantize", 2, False, True, 24, 24, 1,
        "2 passes (min/max; scale, round, clamp): comparators and one DSP multiply per lane"),
}


def unit_price(unit: NonlinearUnit) -> UnitPrice:
    """The price of a nonlinear unit, or UnpricedOpError naming it."""
    price = PRICES.get(unit.op)
    if price is None:
        known = ", ".join(sorted(PRICES))
        raise UnpricedOpError(unit.op, unit.name, "no price for this nonlinear unit kind",
                              fix=f"use one of: {known}")
    return price


def row_cycles(unit: NonlinearUnit, lanes: int) -> int:
    """Cycles for one pass over one row at `lanes` elements per cycle."""
    return math.ceil(unit.row_length / lanes)


def unit_cycles(unit: NonlinearUnit, lanes: int) -> int:
    """Cycles to process every row of the unit once."""
    price = unit_price(unit)
    per_row = row_cycles(unit, lanes)
    if price.pipelined:
        return (unit.rows + price.passes - 1) * per_row
    return unit.rows * price.passes * per_row


def unit_resources(price: UnitPrice, lanes: int) -> Resources:
    """LUT/FF/DSP of a `lanes`-wide unit (row buffers are small and held in LUTRAM/FFs)."""
    return Resources(lut=price.lut_per_lane * lanes, ff=price.ff_per_lane * lanes,
                     dsp=price.dsp_per_lane * lanes)
