"""A streaming, mergeable histogram on a power-of-two grid, built in one pass over the data.

Bin j covers [(first_bin + j) * 2**e, (first_bin + j + 1) * 2**e), a grid anchored at 0. When
new values widen the range past `max_bins` bins, e grows and bins merge pairwise
(k -> k >> d), which is exact because the grid at 2**(e+d) is a coarsening of the grid at
2**e. The final grid depends only on the global min and max (e is the smallest exponent giving
at most `max_bins` bins over them), so the counts equal a direct histogram of all values on
that grid: independent of sample order and chunking, bit for bit. A first min/max pass and
then a fixed-range pass would give the same quality but run the model twice; ONNX Runtime's
histogram calibrators instead keep every sample's activations until the end (its memory
peak). The price is resolution: more than max_bins/2 bins span the data (the default 4096
gives at least 2048, TensorRT's count); bins are also never finer than 2**-40 of the largest
|value|, which only matters for data far narrower than its magnitude.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_MIN_EXPONENT = -1100  # bin exponent of an all-zero tensor: below any data's exponent
_MAGNITUDE_BITS = 40  # bins never finer than 2**-40 of the largest |value| (indices < 2**41)


@dataclass(frozen=True, eq=False)
class Histogram:
    """Counts of finite values: counts[j] counts [(first_bin + j) * w, (first_bin + j + 1) * w),
    w = 2**exponent."""

    exponent: int
    first_bin: int
    counts: np.ndarray  # int64, read-only

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.exponent)

    def edges(self) -> np.ndarray:
        bins = self.first_bin + np.arange(len(self.counts) + 1, dtype=np.int64)
        return np.ldexp(bins.astype(np.float64), self.exponent)

    def bounded(self, max_magnitude_bins: int) -> "Histogram":
        """This histogram, its bins merged pairwise until |x| spans at most `max_magnitude_bins`
        bins from 0 (itself when it already does). Data far from 0 relative to its spread (a
        constant tensor: one bin at 2**40 widths from 0) would otherwise fold into a dense
        magnitude array of up to 2**41 entries."""
        last = self.first_bin + len(self.counts) - 1
        largest = max(last, -self.first_bin - 1, 0)
        shift = max(0, (largest // max_magnitude_bins).bit_length())
        if shift == 0:
            return self
        bins = (self.first_bin + np.arange(len(self.counts), dtype=np.int64)) >> shift
        first = int(bins[0])
        merged = np.zeros(int(bins[-1]) - first + 1, np.int64)
        np.add.at(merged, bins - first, self.counts)
        merged.setflags(write=False)
        return Histogram(self.exponent + shift, first, merged)

    def magnitude_counts(self) -> np.ndarray:
        """Counts of |x| on bins [j * w, (j + 1) * w), j = 0, 1, ... (the grid is symmetric about 0)."""
        return _fold(self.first_bin + np.arange(len(self.counts)), self.counts)

    def side_counts(self, negative: bool) -> np.ndarray:
        """Counts of |x| on the magnitude grid for the values of one sign only."""
        bins = self.first_bin + np.arange(len(self.counts))
        keep = bins < 0 if negative else bins >= 0
        if not keep.any():
            return np.zeros(1, np.int64)
        return _fold(bins[keep], self.counts[keep])


def _fold(bins: np.ndarray, counts: np.ndarray) -> np.ndarray:
    magnitude = np.where(bins >= 0, bins, -bins - 1)  # [k w, (k+1) w) for k < 0 holds |x| in ((-k-1) w, -k w]
    folded = np.zeros(int(magnitude.max()) + 1, np.int64)
    np.add.at(folded, magnitude, counts)
    return folded


def _bin_of(value: float, exponent: int) -> int:
    return math.floor(math.ldexp(value, -exponent))


def _bin_exponent(lo: float, hi: float, max_bins: int) -> int:
    """Smallest e with at most max_bins bins of width 2**e over [lo, hi] (and not below the
    magnitude floor). Monotone under widening [lo, hi], which makes streaming order-free."""
    magnitude = max(-lo, hi)
    if magnitude == 0:
        return _MIN_EXPONENT
    exponent = math.frexp(magnitude)[1] - _MAGNITUDE_BITS
    if hi > lo:  # at e = frexp(span/max_bins) - 2 bins are >= 2 * max_bins: start there
        exponent = max(exponent, math.frexp((hi - lo) / max_bins)[1] - 2)
    while _bin_of(hi, exponent) - _bin_of(lo, exponent) + 1 > max_bins:
        exponent += 1
    return exponent


class StreamingHistogram:
    """Accumulates a `Histogram` from blocks of finite float64 values (see the module notes)."""

    def __init__(self, max_bins: int):
        self.max_bins = max_bins
        self.exponent = _MIN_EXPONENT
        self.first_bin = 0
        self.counts: np.ndarray | None = None
        self.lo, self.hi = math.inf, -math.inf

    def add(self, values: np.ndarray, lo: float, hi: float) -> None:
        new_lo, new_hi = min(self.lo, lo), max(self.hi, hi)
        exponent = _bin_exponent(new_lo, new_hi, self.max_bins)
        if self.counts is None:
            self.exponent, self.first_bin = exponent, _bin_of(new_lo, exponent)
            self.counts = np.zeros(_bin_of(new_hi, exponent) - self.first_bin + 1, np.int64)
        elif exponent > self.exponent:
            self._coarsen(exponent)
        self._cover(new_lo, new_hi)
        bins = np.floor(np.ldexp(values, -self.exponent)).astype(np.int64) - self.first_bin
        self.counts += np.bincount(bins, minlength=len(self.counts))
        self.lo, self.hi = new_lo, new_hi

    def _coarsen(self, exponent: int) -> None:
        shift = min(exponent - self.exponent, 63)  # an arithmetic shift floors negative bins too
        merged_bins = (self.first_bin + np.arange(len(self.counts), dtype=np.int64)) >> shift
        first = int(merged_bins[0])
        merged = np.zeros(int(merged_bins[-1]) - first + 1, np.int64)
        np.add.at(merged, merged_bins - first, self.counts)
        self.exponent, self.first_bin, self.counts = exponent, first, merged

    def _cover(self, lo: float, hi: float) -> None:
        first, last = _bin_of(lo, self.exponent), _bin_of(hi, self.exponent)
        below = self.first_bin - first
        above = last - (self.first_bin + len(self.counts) - 1)
        if below > 0 or above > 0:
            self.counts = np.pad(self.counts, (max(below, 0), max(above, 0)))
            self.first_bin = min(first, self.first_bin)

    def result(self) -> Histogram | None:
        if self.counts is None:
            return None
        self.counts.setflags(write=False)  # the result shares the counts: no more adds
        return Histogram(self.exponent, self.first_bin, self.counts)
