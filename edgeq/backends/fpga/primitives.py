"""Resource vectors and the FPGA primitive mappings both templates share.

Published formulas used here (read, not copied; see the FINN sources named below):
* RAMB18 count of a depth x width memory: FINN `matrixvectoractivation.py` `bram_estimation`
  (FINN-R, Blott et al. 2018), which assumes simple-dual-port RAMB18 aspect ratios
  (16Kx1, 8Kx2, 4Kx4, 2Kx9, 1Kx18, 512x36; Xilinx UG573).
* URAM count: FINN `uram_estimation` (URAM288 as 4K x 72).
* Accumulator width bound: FINN `lut_estimation`, after Colbert et al. (arXiv 2301.13376).
* DSP tiling of a wide product: a DSP48E2 multiplies 27x18 and a DSP48E1 25x18 two's complement
  operands (UG579 / UG479); wider products take ceil(a/27)·ceil(b/18) slices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

RESOURCE_NAMES = ("lut", "ff", "bram18", "uram", "dsp")

# Multiplier port widths of one DSP slice: (wide port A/pre-adder, narrow port B).
DSP_PORTS = {"DSP48E2": (27, 18), "DSP48E1": (25, 18)}


@dataclass(frozen=True)
class Resources:
    """An amount of FPGA resources (fractional values are allowed for intermediate sums)."""

    lut: float = 0.0
    ff: float = 0.0
    bram18: float = 0.0
    uram: float = 0.0
    dsp: float = 0.0

    def __add__(self, other: Resources) -> Resources:
        return Resources(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def scaled(self, factor: float) -> Resources:
        return Resources(*(getattr(self, f.name) * factor for f in fields(self)))

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in RESOURCE_NAMES}


def total(items: list[Resources]) -> Resources:
    out = Resources()
    for item in items:
        out = out + item
    return out


def bram18_for_memory(depth: int, width: int) -> int:
    """RAMB18s for a depth x width ROM/RAM (FINN bram_estimation, SDP RAMB18 aspect ratios)."""
    if depth <= 0 or width <= 0:
        return 0
    if width == 1:
        return math.ceil(depth / 16384)
    if width == 2:
        return math.ceil(depth / 8192)
    if width <= 4:
        return math.ceil(depth / 4096)
    if width <= 9:
        return math.ceil(depth / 2048)
    if width <= 18 or depth > 512:
        return math.ceil(depth / 1024) * math.ceil(width / 18)
    return math.ceil(depth / 512) * math.ceil(width / 36)


def uram_for_memory(depth: int, width: int) -> int:
    """URAM288 blocks for a depth x width memory (FINN uram_estimation: 4096 x 72 each)."""
    if depth <= 0 or width <= 0:
        return 0
    return math.ceil(width / 72) * math.ceil(depth / 4096)


def accumulator_bits(mw: int, w_bits: int, a_bits: int, a_signed: bool) -> int:
    """Data-type bound on the accumulator width of an MW-term dot product (FINN, Colbert et al.)."""
    alpha = math.log2(mw) + w_bits + a_bits - 1 - int(a_signed)
    return math.ceil(alpha + math.log2(1 + 2 ** -alpha) + 1)


def dsp_slices_per_product(a_bits: int, b_bits: int, dsp_slice: str) -> int:
    """DSP slices one a x b product takes when tiled onto the slice's multiplier."""
    wide, narrow = DSP_PORTS[dsp_slice]
    big, small = max(a_bits, b_bits), min(a_bits, b_bits)
    return math.ceil(big / wide) * math.ceil(small / narrow)


def divisors(n: int) -> list[int]:
    """Positive divisors of n, ascending (legal PE/SIMD values: MH % PE == MW % SIMD == 0)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})
