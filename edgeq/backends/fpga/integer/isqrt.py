"""Integer square root floor(sqrt(n)) by guarded Newton iterations, unrolled into a fixed graph.

- Start: x0 = 2^ceil(bitlen(n)/2) >= sqrt(n) (I-BERT's start, Kim et al., 2021, "Integer-only
  LayerNorm"); bitlen comes from a log-depth priority encoder (compare, shift, accumulate).
- Step: x' = min(x, (x + n // max(x, 1)) >> 1). From above, integer Newton never goes below
  floor(sqrt(n)) and is at most the real Newton iterate; the min guard makes floor(sqrt(n)) a
  fixed point (plain Newton may flip to floor+1 when n+1 is a square), and max(x, 1) keeps
  n = 0 from dividing by zero.
- Count: the real iterate's relative error from x0 <= 2 sqrt(n) is e0 <= 1 and
  e' = e^2 / (2(1 + e)); once e < 2^-(bits+2) the real iterate is below floor(sqrt(n)) + 1, so
  the integer one is exact. That is 5 iterations for n < 2^31 and 6 for n < 2^62;
  tools/check_isqrt_exhaustive.py verifies every int32.
All arithmetic is unsigned (32-bit below 2^31, else 64-bit); negative inputs are treated as 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeq.errors import OptionError
import edgeq.backends.fpga.integer.ops as ops
from edgeq.backends.fpga.integer.builder import IntGraphBuilder
from edgeq.backends.fpga.integer.fixedpoint import np_bit_length


def newton_iterations(value_bits: int) -> int:
    """Iterations after which guarded Newton from 2^ceil(bitlen/2) is exact for n < 2^value_bits."""
    error, count = 1.0, 0
    while error >= 2.0 ** -(value_bits + 2):
        error, count = error * error / (2.0 * (1.0 + error)), count + 1
    return count


@dataclass(frozen=True)
class ISqrt:
    """floor(sqrt(n)) for integer 0 <= n < 2^value_bits (value_bits <= 62)."""

    value_bits: int = 31

    def __post_init__(self) -> None:
        if not 1 <= self.value_bits <= 62:
            raise OptionError(f"isqrt value_bits {self.value_bits} is outside 1..62")

    @property
    def iterations(self) -> int:
        return newton_iterations(self.value_bits)

    @property
    def work_dtype(self) -> np.dtype:
        """uint32 suffices below 2^31 (x + n // x < 2^32) and halves the memory traffic."""
        return np.dtype(np.uint32) if self.value_bits <= 31 else ops.U64

    def emit(self, b: IntGraphBuilder, n: str) -> str:
        """Append floor(sqrt(n)) for an int32 or int64 tensor `n`; same dtype out."""
        with b.scope("isqrt"):
            dtype = b.dtype(n)
            value = ops.cast(b, b.op("Max", [n, b.const(0, dtype, "zero")], "non_negative"), self.work_dtype)
            root = self._emit_start(b, value)
            one = b.const(1, self.work_dtype, "one")
            for _ in range(self.iterations):
                quotient = b.op("Div", [value, b.op("Max", [root, one], "divisor")], "n_over_x")
                step = b.op("BitShift", [b.op("Add", [root, quotient], "x_plus_q"), one], "newton", direction="RIGHT")
                root = b.op("Min", [root, step], "root")
            return ops.cast(b, root, dtype)

    def _emit_start(self, b: IntGraphBuilder, value: str) -> str:
        """2^ceil(bitlen(value)/2), with bitlen from the priority encoder."""
        one = b.const(1, self.work_dtype, "one")
        bitlen_plus_one = b.op("Add", [ops.bit_length(b, value, self.value_bits), one], "bitlen_plus_one")
        half = b.op("BitShift", [bitlen_plus_one, one], "half_bitlen", direction="RIGHT")
        return b.op("BitShift", [one, half], "start", direction="LEFT")

    def reference(self, n: np.ndarray) -> np.ndarray:
        """numpy mirror of `emit` (same dtype out)."""
        value = np.maximum(np.asarray(n), 0).astype(np.int64)
        root = np.left_shift(1, (np_bit_length(value, self.value_bits) + 1) >> 1)
        for _ in range(self.iterations):
            root = np.minimum(root, (root + value // np.maximum(root, 1)) >> 1)
        return root.astype(np.asarray(n).dtype)


def emit_isqrt(b: IntGraphBuilder, n: str, *, value_bits: int = 31) -> str:
    """Append floor(sqrt(n)) for an int32/int64 tensor `n` with 0 <= n < 2^value_bits."""
    return ISqrt(value_bits).emit(b, n)


def isqrt_reference(n: np.ndarray, *, value_bits: int = 31) -> np.ndarray:
    """Bit-exact numpy model of `emit_isqrt`."""
    return ISqrt(value_bits).reference(n)
