"""Quantization ranges from a tensor's statistics: min/max, or percentile, entropy (TensorRT's
KL-divergence threshold) and MSE over its power-of-two-grid `Histogram`.

Every range contains 0 (zero must be exact) and is (-a, a) when symmetric (`with_zero`).
"""

from __future__ import annotations

import math
from enum import Enum

import numpy as np

from edgeq.calibration.histogram import Histogram
from edgeq.errors import OptionError

_MAX_KL_CANDIDATES = 512  # thresholds tried by the entropy search (TensorRT tries ~1900)


class RangeMethod(str, Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"  # TensorRT's KL-divergence threshold
    MSE = "mse"  # least expected squared quantization error (clipping + rounding)


# The range methods fold the histogram about 0; data far from 0 relative to its spread is first
# coarsened so the folded arrays stay this small (normal activations span 0 in at most a few
# times max_bins bins and are not touched).
MAX_MAGNITUDE_BINS = 1 << 14


def range_method(method: RangeMethod | str) -> RangeMethod:
    try:
        return RangeMethod(method)
    except ValueError:
        known = ", ".join(m.value for m in RangeMethod)
        raise OptionError(f"unknown range method '{method}'", fix=f"use one of {known}") from None


def check_range_args(percentile: float, num_bits: int) -> None:
    if not 0 < percentile <= 100:
        raise OptionError(f"percentile={percentile}", fix="use a percentile in (0, 100], e.g. 99.99")
    if not 2 <= num_bits <= 16:
        raise OptionError(f"num_bits={num_bits}", fix="use 2..16 bits")


def histogram_range(method: RangeMethod, hist: Histogram, lo: float, hi: float, symmetric: bool, *,
                    percentile: float, num_bits: int) -> tuple[float, float]:
    """(lo, hi) by a histogram method (percentile, entropy, mse) for values in [lo, hi] whose
    histogram is `hist`; not yet widened to contain 0 (see `with_zero`)."""
    hist = hist.bounded(MAX_MAGNITUDE_BINS)
    if method is RangeMethod.PERCENTILE:
        return _percentile_range(hist, lo, hi, percentile, symmetric)
    if method is RangeMethod.ENTROPY:
        return _entropy_range(hist, lo, hi, symmetric, num_bits)
    if method is RangeMethod.MSE:
        return _mse_range(hist, lo, hi, symmetric, num_bits)
    raise ValueError(f"{method} is not a histogram range method")


def with_zero(lo: float, hi: float, symmetric: bool) -> tuple[float, float]:
    if symmetric:
        limit = max(-lo, hi, 0.0)
        return -limit, limit
    return min(lo, 0.0), max(hi, 0.0)


# --------------------------------------------------------------------------------------------
# Percentile.

def _quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """Value below which a fraction q of the counts lie, linear within a bin."""
    cumulative = np.cumsum(counts)
    target = q * float(cumulative[-1])
    index = min(int(np.searchsorted(cumulative, target, side="left")), len(counts) - 1)
    before = float(cumulative[index - 1]) if index else 0.0
    inside = float(counts[index])
    fraction = (target - before) / inside if inside else 0.0
    return float(edges[index] + min(max(fraction, 0.0), 1.0) * (edges[index + 1] - edges[index]))


def _percentile_range(hist: Histogram, lo: float, hi: float, percentile: float,
                      symmetric: bool) -> tuple[float, float]:
    if symmetric:  # ORT's and TensorRT's recipe: the percentile of |x|
        magnitudes = hist.magnitude_counts()
        edges = np.ldexp(np.arange(len(magnitudes) + 1, dtype=np.float64), hist.exponent)
        limit = min(_quantile(magnitudes, edges, percentile / 100), max(-lo, hi))
        return -limit, limit
    tail = (1 - percentile / 100) / 2  # the clipped mass is split between the two tails
    edges = hist.edges()
    return max(_quantile(hist.counts, edges, tail), lo), min(_quantile(hist.counts, edges, 1 - tail), hi)


# --------------------------------------------------------------------------------------------
# Entropy (KL divergence).

def _smooth(distribution: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """Give empty bins a little mass so KL stays finite (MXNet's and ORT's smoothing)."""
    zero = distribution == 0
    nonzero = distribution.size - int(zero.sum())
    if nonzero == 0:
        return None
    taken = eps * int(zero.sum()) / nonzero
    return np.maximum(distribution + eps * zero - taken * ~zero, 1e-12)


def _kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> float:
    p = _smooth(reference / reference.sum())
    q = _smooth(candidate / candidate.sum()) if candidate.sum() > 0 else None
    if p is None or q is None:
        return math.inf
    return float(np.sum(p * np.log(p / q)))


def _quantized(sliced: np.ndarray, nonzero: np.ndarray, levels: int) -> np.ndarray:
    """`sliced` merged into `levels` groups, each group's mass spread over its nonzero bins."""
    group = (np.arange(len(sliced)) * levels) // len(sliced)
    sums = np.bincount(group, weights=sliced, minlength=levels)
    filled = np.bincount(group, weights=nonzero, minlength=levels)
    return np.where(nonzero, sums[group] / np.maximum(filled[group], 1), 0.0)


def _kl_threshold_bins(counts: np.ndarray, levels: int) -> int:
    """TensorRT's entropy calibration on a magnitude histogram: the number of leading bins
    whose clipping (outliers folded into the last bin) loses least information (KL) when
    quantized to `levels` levels."""
    size = len(counts)
    if size <= levels:
        return size
    counts = counts.astype(np.float64)
    tails = np.cumsum(counts[::-1])[::-1]  # tails[i] = counts[i:].sum()
    stride = max(1, (size - levels) // _MAX_KL_CANDIDATES)
    best_bins, best_kl = size, math.inf
    for bins in [*range(levels, size, stride), size]:
        reference = counts[:bins].copy()
        if bins < size:
            reference[-1] += tails[bins]
        kl = _kl_divergence(reference, _quantized(counts[:bins], reference > 0, levels))
        if kl < best_kl:
            best_bins, best_kl = bins, kl
    return best_bins


def _entropy_range(hist: Histogram, lo: float, hi: float, symmetric: bool, num_bits: int) -> tuple[float, float]:
    width = hist.width
    if symmetric:
        limit = _kl_threshold_bins(hist.magnitude_counts(), 2 ** (num_bits - 1)) * width
        limit = min(limit, max(-lo, hi))
        return -limit, limit
    # TensorRT's method is symmetric; for asymmetric ranges each sign gets its own threshold,
    # with all levels when the data has one sign and half of them each otherwise.
    one_sided = lo >= 0 or hi <= 0
    levels = 2 ** num_bits if one_sided else 2 ** (num_bits - 1)
    high = low = 0.0
    if hi > 0:
        high = min(_kl_threshold_bins(hist.side_counts(negative=False), levels) * width, hi)
    if lo < 0:
        low = max(-_kl_threshold_bins(hist.side_counts(negative=True), levels) * width, lo)
    return low, high


# --------------------------------------------------------------------------------------------
# Mean squared error.

def _mse_range(hist: Histogram, lo: float, hi: float, symmetric: bool, num_bits: int) -> tuple[float, float]:
    """The candidate range with the least expected squared error: values beyond the range cost
    their distance to it squared (bin centers), values inside cost step**2 / 12 (rounding)."""
    edges = hist.edges()
    centers, counts = (edges[:-1] + edges[1:]) / 2, hist.counts.astype(np.float64)
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        amax = max(-lo0, hi0)
        limits = np.ldexp(np.arange(1, len(hist.magnitude_counts()) + 1, dtype=np.float64), hist.exponent)
        limits = np.unique(np.append(limits[limits < amax], amax))
        lows, highs = -limits, limits
        steps = limits / (2 ** (num_bits - 1) - 1)
    else:  # shrink the zero-inclusive [min, max] by s, with s landing on bin edges
        shrink = [edges[edges > 0] / hi0] if hi0 > 0 else []
        shrink += [edges[edges < 0] / lo0] if lo0 < 0 else []
        scales = np.concatenate([*shrink, [1.0]])
        scales = np.unique(scales[(scales > 0) & (scales <= 1)])
        lows, highs = scales * lo0, scales * hi0
        steps = (highs - lows) / (2 ** num_bits - 1)
    errors = _expected_squared_error(centers, counts, lows, highs, steps)
    best = int(np.argmin(errors))
    return float(lows[best]), float(highs[best])


def _expected_squared_error(centers: np.ndarray, counts: np.ndarray, lows: np.ndarray,
                            highs: np.ndarray, steps: np.ndarray) -> np.ndarray:
    # Prefix sums of n, n*c, n*c^2 make each candidate O(log bins).
    s0 = np.concatenate([[0.0], np.cumsum(counts)])
    s1 = np.concatenate([[0.0], np.cumsum(counts * centers)])
    s2 = np.concatenate([[0.0], np.cumsum(counts * centers * centers)])
    below = np.searchsorted(centers, lows, side="left")  # bins [0, below) lie under the range
    above = np.searchsorted(centers, highs, side="right")  # bins [above, n) lie over it
    clipped_low = s2[below] - 2 * lows * s1[below] + lows ** 2 * s0[below]
    clipped_high = ((s2[-1] - s2[above]) - 2 * highs * (s1[-1] - s1[above])
                    + highs ** 2 * (s0[-1] - s0[above]))
    rounding = (s0[above] - s0[below]) * steps ** 2 / 12
    return clipped_low + clipped_high + rounding
