"""Calibration: run the float model in ONNX Runtime over calibration data and stream statistics.

    stats = calibrate("model.onnx", TokenWindows(ids, 256, 16, first_window=1000),
                      tensors=["x", "h"], options=CalibrationOptions(channel_axis=-1))
    lo, hi = stats["x"].range("percentile", symmetric=True, percentile=99.99)
    stats.save("calib.npz"); again = CalibrationResult.load("calib.npz")

Works on an `onnx.ModelProto` or a path, independent of edgeq's graph IR.

Memory is bounded by the model plus one sample's requested activations:
- Samples stream one at a time; per tensor we keep running min/max (per tensor and per
  channel), a histogram of at most `histogram_bins` int64 counts and two counters.
- Large weights are not copied into ONNX Runtime: the session gets a weight-less copy of the
  graph in which each large initializer is a graph input, and the weight arrays (views of the
  proto's bytes, or memory maps of external data) are fed with every run. ORT reads CPU numpy
  inputs in place, so the weights exist once, not three times (proto, serialized bytes, ORT).
  Loading an .onnx with inline weights briefly holds them twice (file bytes and protobuf, then
  protobuf and arrays; the protobuf is freed before the first run); external data is
  memory-mapped and never held twice. Fed weights take other MLAS kernels than constant,
  prepacked ones, so activations equal a plain ORT session's to float32 rounding, not bit for bit.
- The session's graph outputs are exactly the requested tensors, and nodes that do not lead
  to them are pruned (a model's logits are not computed unless asked for).
- `outputs_per_run` splits the requested tensors into groups, one session and one pass over
  the data per group, for models whose activations of one sample do not fit at once.

Histograms are streamed in one pass with a mergeable power-of-two grid (`Histogram`): bin j
covers [(first_bin + j) * 2**e, (first_bin + j + 1) * 2**e), a grid anchored at 0. When new
values widen the range past `histogram_bins` bins, e grows and bins merge pairwise (k -> k >> d),
which is exact because the grid at 2**(e+d) is a coarsening of the grid at 2**e. The final
grid depends only on the global min and max (e is the smallest exponent giving at most
`histogram_bins` bins over them), so the counts equal a direct histogram of all values on that
grid: independent of sample order and chunking, bit for bit. A first min/max pass and then a
fixed-range pass would give the same quality but run the model twice; ONNX Runtime's
histogram calibrators instead keep every sample's activations until the end (its memory
peak). The price is resolution: more than histogram_bins/2 bins span the data (the default
4096 gives at least 2048, TensorRT's count); bins are also never finer than 2**-40 of the
largest |value|, which only matters for data far narrower than its magnitude.

Determinism: ONNX Runtime runs on the CPU with graph optimizations disabled (so every
intermediate tensor keeps its name) and a fixed thread count; all statistics are exact
(min/max, integer counts), so the same data give the same result bit for bit.

Non-finite activations (e.g. a -inf attention mask) are counted in `nonfinite` and left out of
min/max/histograms.
"""

from __future__ import annotations

import difflib
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgeq.calibration.sources import Feed, ModelLike, open_source
from edgeq.errors import CalibrationError, ExternalDataError, ModelLoadError, OptionError

_FORMAT = "edgeq.calibration/1"
_BLOCK = 1 << 20  # values per block: bounds the float64/int64 temporaries of one update
_MIN_EXPONENT = -1100  # bin exponent of an all-zero tensor: below any data's exponent
_MAGNITUDE_BITS = 40  # bins never finer than 2**-40 of the largest |value| (indices < 2**41)
_MAX_KL_CANDIDATES = 512  # thresholds tried by the entropy search (TensorRT tries ~1900)
_MIN_WEIGHT_ELEMENTS = 1024  # smaller initializers (shapes, scalars) stay in the graph
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
_FEEDABLE_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BOOL,
                   TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
                   TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64)


# --------------------------------------------------------------------------------------------
# Options.

@dataclass(frozen=True)
class CalibrationOptions:
    """How statistics are collected.

    histogram: collect histograms (needed by the percentile, entropy and mse ranges).
    histogram_bins: most bins per histogram; at least half of them span the data.
    channel_axis: also keep min/max per channel along this axis (e.g. -1, the hidden dim);
        tensors of rank 0 get none.
    threads: ONNX Runtime intra-op threads; results are bit-identical for a fixed count.
    outputs_per_run: fetch at most this many tensors per run (one pass over the data each);
        None fetches all at once.
    progress: show a tqdm bar; None shows it only when stderr is a terminal.
    """

    histogram: bool = True
    histogram_bins: int = 4096
    channel_axis: int | None = None
    threads: int = 1
    outputs_per_run: int | None = None
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.histogram_bins < 16:
            raise OptionError(f"histogram_bins={self.histogram_bins} is too few", fix="use at least 16 (default 4096)")
        if self.threads < 1:
            raise OptionError(f"threads={self.threads}", fix="use 1 or more threads")
        if self.outputs_per_run is not None and self.outputs_per_run < 1:
            raise OptionError(f"outputs_per_run={self.outputs_per_run}", fix="use None or a positive count")


class RangeMethod(str, Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"  # TensorRT's KL-divergence threshold
    MSE = "mse"  # least expected squared quantization error (clipping + rounding)


# --------------------------------------------------------------------------------------------
# Histograms on a power-of-two grid.

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


class _StreamingHistogram:
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
        return Histogram(self.exponent, self.first_bin, _frozen(self.counts))


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


# --------------------------------------------------------------------------------------------
# Ranges from statistics.

def _quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """Value below which a fraction q of the counts lie, linear within a bin."""
    cumulative = np.cumsum(counts)
    target = q * float(cumulative[-1])
    index = min(int(np.searchsorted(cumulative, target, side="left")), len(counts) - 1)
    before = float(cumulative[index - 1]) if index else 0.0
    inside = float(counts[index])
    fraction = (target - before) / inside if inside else 0.0
    return float(edges[index] + min(max(fraction, 0.0), 1.0) * (edges[index + 1] - edges[index]))


def _percentile_range(stats: TensorStats, percentile: float, symmetric: bool) -> tuple[float, float]:
    hist = stats.histogram
    if symmetric:  # ORT's and TensorRT's recipe: the percentile of |x|
        magnitudes = hist.magnitude_counts()
        edges = np.ldexp(np.arange(len(magnitudes) + 1, dtype=np.float64), hist.exponent)
        limit = min(_quantile(magnitudes, edges, percentile / 100), max(-stats.min, stats.max))
        return -limit, limit
    tail = (1 - percentile / 100) / 2  # the clipped mass is split between the two tails
    edges = hist.edges()
    lo = max(_quantile(hist.counts, edges, tail), stats.min)
    hi = min(_quantile(hist.counts, edges, 1 - tail), stats.max)
    return lo, hi


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


def _entropy_range(stats: TensorStats, symmetric: bool, num_bits: int) -> tuple[float, float]:
    hist, width = stats.histogram, stats.histogram.width
    if symmetric:
        limit = _kl_threshold_bins(hist.magnitude_counts(), 2 ** (num_bits - 1)) * width
        limit = min(limit, max(-stats.min, stats.max))
        return -limit, limit
    # TensorRT's method is symmetric; for asymmetric ranges each sign gets its own threshold,
    # with all levels when the data has one sign and half of them each otherwise.
    one_sided = stats.min >= 0 or stats.max <= 0
    levels = 2 ** num_bits if one_sided else 2 ** (num_bits - 1)
    hi = lo = 0.0
    if stats.max > 0:
        hi = min(_kl_threshold_bins(hist.side_counts(negative=False), levels) * width, stats.max)
    if stats.min < 0:
        lo = max(-_kl_threshold_bins(hist.side_counts(negative=True), levels) * width, stats.min)
    return lo, hi


def _mse_range(stats: TensorStats, symmetric: bool, num_bits: int) -> tuple[float, float]:
    """The candidate range with the least expected squared error: values beyond the range cost
    their distance to it squared (bin centers), values inside cost step**2 / 12 (rounding)."""
    hist = stats.histogram
    edges = hist.edges()
    centers, counts = (edges[:-1] + edges[1:]) / 2, hist.counts.astype(np.float64)
    lo0, hi0 = min(stats.min, 0.0), max(stats.max, 0.0)
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


# --------------------------------------------------------------------------------------------
# Results.

@dataclass(frozen=True, eq=False)
class TensorStats:
    """Statistics of one tensor over all calibration samples (finite values only)."""

    name: str
    dtype: str
    count: int  # finite values seen
    nonfinite: int  # NaN/Inf values seen, left out of everything else
    min: float
    max: float
    histogram: Histogram | None = None
    channel_axis: int | None = None  # non-negative
    channel_min: np.ndarray | None = None  # float64 per channel, read-only
    channel_max: np.ndarray | None = None

    def range(self, method: RangeMethod | str = RangeMethod.MINMAX, symmetric: bool = False, *,
              percentile: float = 99.99, num_bits: int = 8) -> tuple[float, float]:
        """(lo, hi) to quantize this tensor with; it always contains 0 (zero must be exact),
        and is (-a, a) when symmetric. percentile applies to 'percentile'; num_bits to
        'entropy' and 'mse'."""
        method = _range_method(method)
        _check_range_args(percentile, num_bits)
        if self.count == 0:
            raise CalibrationError(f"tensor '{self.name}' had no finite values in calibration",
                                   fix="leave it unquantized or check the data")
        if method is RangeMethod.MINMAX:
            lo, hi = self.min, self.max
        elif self.histogram is None:
            raise OptionError(f"range '{method.value}' of '{self.name}' needs a histogram",
                              fix="calibrate with CalibrationOptions(histogram=True)")
        elif method is RangeMethod.PERCENTILE:
            lo, hi = _percentile_range(self, percentile, symmetric)
        elif method is RangeMethod.ENTROPY:
            lo, hi = _entropy_range(self, symmetric, num_bits)
        else:
            lo, hi = _mse_range(self, symmetric, num_bits)
        return _with_zero(lo, hi, symmetric)

    def channel_range(self, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel min/max ranges (containing 0), along `channel_axis`."""
        if self.channel_min is None or self.channel_max is None:
            raise OptionError(f"tensor '{self.name}' has no per-channel statistics",
                              fix="calibrate with CalibrationOptions(channel_axis=...)")
        lo, hi = np.minimum(self.channel_min, 0.0), np.maximum(self.channel_max, 0.0)
        if symmetric:
            limit = np.maximum(-lo, hi)
            return -limit, limit
        return lo, hi


def _range_method(method: RangeMethod | str) -> RangeMethod:
    try:
        return RangeMethod(method)
    except ValueError:
        known = ", ".join(m.value for m in RangeMethod)
        raise OptionError(f"unknown range method '{method}'", fix=f"use one of {known}") from None


def _check_range_args(percentile: float, num_bits: int) -> None:
    if not 0 < percentile <= 100:
        raise OptionError(f"percentile={percentile}", fix="use a percentile in (0, 100], e.g. 99.99")
    if not 2 <= num_bits <= 16:
        raise OptionError(f"num_bits={num_bits}", fix="use 2..16 bits")


def _with_zero(lo: float, hi: float, symmetric: bool) -> tuple[float, float]:
    if symmetric:
        limit = max(-lo, hi, 0.0)
        return -limit, limit
    return min(lo, 0.0), max(hi, 0.0)


class CalibrationResult(Mapping[str, TensorStats]):
    """Tensor name -> `TensorStats`, in the order the tensors were requested."""

    def __init__(self, stats: Mapping[str, TensorStats], num_samples: int, histogram_bins: int):
        self._stats = dict(stats)
        self.num_samples = num_samples
        self.histogram_bins = histogram_bins

    def __getitem__(self, name: str) -> TensorStats:
        return self._stats[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stats)

    def __len__(self) -> int:
        return len(self._stats)

    def ranges(self, method: RangeMethod | str = RangeMethod.MINMAX, symmetric: bool = False, *,
               percentile: float = 99.99, num_bits: int = 8) -> dict[str, tuple[float, float]]:
        return {name: stats.range(method, symmetric, percentile=percentile, num_bits=num_bits)
                for name, stats in self._stats.items()}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to an .npz (exactly at `path`; no pickles, loads with numpy alone)."""
        arrays: dict[str, np.ndarray] = {
            "format": np.array(_FORMAT), "names": np.array(list(self._stats), dtype=str),
            "num_samples": np.array(self.num_samples, np.int64),
            "histogram_bins": np.array(self.histogram_bins, np.int64)}
        for index, stats in enumerate(self._stats.values()):
            arrays.update(_stats_arrays(f"{index}/", stats))
        with open(path, "wb") as out:
            np.savez(out, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationResult:
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"cannot read calibration statistics '{path}': {exc}",
                                   fix="give a file written by CalibrationResult.save") from exc
        if "format" not in arrays or str(arrays["format"]) != _FORMAT:
            raise CalibrationError(f"'{path}' is not an edgeq calibration file ({_FORMAT})",
                                   fix="give a file written by CalibrationResult.save")
        names = [str(n) for n in arrays["names"]]
        stats = {name: _stats_from_arrays(name, f"{i}/", arrays) for i, name in enumerate(names)}
        return cls(stats, int(arrays["num_samples"]), int(arrays["histogram_bins"]))


def _stats_arrays(prefix: str, stats: TensorStats) -> dict[str, np.ndarray]:
    arrays = {f"{prefix}dtype": np.array(stats.dtype),
              f"{prefix}counts": np.array([stats.count, stats.nonfinite], np.int64),
              f"{prefix}minmax": np.array([stats.min, stats.max], np.float64)}
    if stats.histogram is not None:
        arrays[f"{prefix}hist_grid"] = np.array([stats.histogram.exponent, stats.histogram.first_bin], np.int64)
        arrays[f"{prefix}hist_counts"] = stats.histogram.counts
    if stats.channel_min is not None:
        arrays[f"{prefix}channel_axis"] = np.array(stats.channel_axis, np.int64)
        arrays[f"{prefix}channel_min"] = stats.channel_min
        arrays[f"{prefix}channel_max"] = stats.channel_max
    return arrays


def _stats_from_arrays(name: str, prefix: str, arrays: Mapping[str, np.ndarray]) -> TensorStats:
    count, nonfinite = (int(v) for v in arrays[f"{prefix}counts"])
    lo, hi = (float(v) for v in arrays[f"{prefix}minmax"])
    histogram = None
    if f"{prefix}hist_grid" in arrays:
        exponent, first_bin = (int(v) for v in arrays[f"{prefix}hist_grid"])
        histogram = Histogram(exponent, first_bin, _frozen(arrays[f"{prefix}hist_counts"].astype(np.int64)))
    channels: dict[str, Any] = {}
    if f"{prefix}channel_axis" in arrays:
        channels = {"channel_axis": int(arrays[f"{prefix}channel_axis"]),
                    "channel_min": _frozen(arrays[f"{prefix}channel_min"].astype(np.float64)),
                    "channel_max": _frozen(arrays[f"{prefix}channel_max"].astype(np.float64))}
    return TensorStats(name, str(arrays[f"{prefix}dtype"]), count, nonfinite, lo, hi, histogram, **channels)


# --------------------------------------------------------------------------------------------
# Accumulating one tensor.

class _TensorAccumulator:
    def __init__(self, name: str, options: CalibrationOptions):
        self.name = name
        self.requested_axis = options.channel_axis
        self.histogram = _StreamingHistogram(options.histogram_bins) if options.histogram else None
        self.dtype: str | None = None
        self.count = self.nonfinite = 0
        self.min, self.max = math.inf, -math.inf
        self.channel_axis: int | None = None
        self.channel_min: np.ndarray | None = None
        self.channel_max: np.ndarray | None = None

    def update(self, values: np.ndarray) -> None:
        values = self._as_float(values)
        if values.size == 0:
            return
        if self.requested_axis is not None and values.ndim > 0:
            self._update_channels(values)
        flat = values.reshape(-1)
        for start in range(0, flat.size, _BLOCK):
            self._update_block(flat[start:start + _BLOCK])

    def _as_float(self, values: np.ndarray) -> np.ndarray:
        if values.dtype.kind != "f" and values.dtype.name != "bfloat16":
            raise OptionError(f"tensor '{self.name}' is {values.dtype}, not a float tensor",
                              fix="calibrate float activations only (see float_activation_names)")
        self.dtype = self.dtype or values.dtype.name
        return values if values.dtype.kind == "f" else values.astype(np.float32)

    def _update_block(self, block: np.ndarray) -> None:
        finite = np.isfinite(block)
        kept = int(np.count_nonzero(finite))
        if kept < block.size:
            self.nonfinite += block.size - kept
            block = block[finite]
        if kept == 0:
            return
        lo, hi = float(block.min()), float(block.max())
        self.count += kept
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        if self.histogram is not None:
            self.histogram.add(block.astype(np.float64), lo, hi)

    def _update_channels(self, values: np.ndarray) -> None:
        axis = self._channel_axis(values.ndim)
        others = tuple(i for i in range(values.ndim) if i != axis)
        if np.isfinite(values).all():
            low, high = values.min(axis=others), values.max(axis=others)
        else:
            finite = np.isfinite(values)
            low = np.where(finite, values, np.inf).min(axis=others)
            high = np.where(finite, values, -np.inf).max(axis=others)
        low, high = low.astype(np.float64), high.astype(np.float64)
        if self.channel_min is None:
            self.channel_axis, self.channel_min, self.channel_max = axis, low, high
            return
        if low.shape != self.channel_min.shape:
            raise CalibrationError(
                f"tensor '{self.name}' has {low.size} channels on axis {axis} in one sample and "
                f"{self.channel_min.size} in another", fix="pick a channel_axis of fixed size (the hidden dim, -1)")
        np.minimum(self.channel_min, low, out=self.channel_min)
        np.maximum(self.channel_max, high, out=self.channel_max)

    def _channel_axis(self, ndim: int) -> int:
        axis = self.requested_axis
        if not -ndim <= axis < ndim:
            raise OptionError(f"channel_axis={axis} is out of range for tensor '{self.name}' of rank {ndim}",
                              fix="pick an axis every calibrated tensor has (e.g. -1)")
        return axis % ndim

    def finish(self) -> TensorStats:
        empty = self.count == 0
        channels: dict[str, Any] = {}
        if self.channel_min is not None:
            # A channel that only ever held NaN/Inf has no range: NaN, not +-inf.
            low = np.where(np.isfinite(self.channel_min), self.channel_min, np.nan)
            high = np.where(np.isfinite(self.channel_max), self.channel_max, np.nan)
            channels = {"channel_axis": self.channel_axis, "channel_min": _frozen(low), "channel_max": _frozen(high)}
        return TensorStats(self.name, self.dtype or "unknown", self.count, self.nonfinite,
                           math.nan if empty else self.min, math.nan if empty else self.max,
                           self.histogram.result() if self.histogram else None, **channels)


# --------------------------------------------------------------------------------------------
# The float model in ONNX Runtime.

def _load_model(model: ModelLike) -> tuple[onnx.ModelProto, Path | None]:
    """The proto (external data left on disk) and the folder its external data lives in."""
    if isinstance(model, onnx.ModelProto):
        return model, None
    path = Path(model)
    if not path.is_file():
        raise ModelLoadError(f"model '{path}' does not exist", fix="give the path of an .onnx file")
    try:
        return onnx.load(os.fspath(path), load_external_data=False), path.parent
    except Exception as exc:  # noqa: BLE001 - onnx raises several unrelated types
        raise ModelLoadError(f"cannot read model '{path}': {exc}", fix="give a valid .onnx file") from exc


def _is_feedable_weight(tensor: TensorProto) -> bool:
    return tensor.data_type in _FEEDABLE_TYPES and math.prod(tensor.dims) >= _MIN_WEIGHT_ELEMENTS


def _weight_less_graph(model: onnx.ModelProto, fed: set[str], base_dir: Path | None) -> onnx.ModelProto:
    """A copy of `model` whose initializers named in `fed` are graph inputs instead (built field
    by field so the weight bytes are never copied)."""
    shell = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name,
                            producer_version=model.producer_version, domain=model.domain,
                            model_version=model.model_version)
    shell.opset_import.extend(model.opset_import)
    shell.functions.extend(model.functions)
    source, graph = model.graph, shell.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    graph.sparse_initializer.extend(source.sparse_initializer)
    declared = {value.name for value in source.input}
    for tensor in source.initializer:
        if tensor.name in fed:
            if tensor.name not in declared:
                graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            graph.initializer.append(_inline(tensor, base_dir))
    return shell


def _inline(tensor: TensorProto, base_dir: Path | None) -> TensorProto:
    """The tensor with any external data read in: a session made from bytes has no folder."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return tensor
    array = _external_array(tensor, base_dir)
    inlined = numpy_helper.from_array(np.asarray(array), tensor.name)
    inlined.data_type = tensor.data_type
    return inlined


def _weight_array(tensor: TensorProto, base_dir: Path | None) -> np.ndarray:
    if tensor.data_location == TensorProto.EXTERNAL:
        return _external_array(tensor, base_dir)
    raw = tensor.raw_data  # one copy of the bytes, owned by the array from here on
    if raw:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        return np.frombuffer(raw, dtype).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


def _external_array(tensor: TensorProto, base_dir: Path | None) -> np.ndarray:
    """A read-only memory map of the tensor's bytes in its external data file."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    if base_dir is None:
        raise ExternalDataError(f"weight '{tensor.name}' lives in external file '{location}' but the "
                                "model was given in memory", fix="pass the model's path instead")
    path = (base_dir / location).resolve()
    if base_dir.resolve() not in path.parents:
        raise ExternalDataError(f"weight '{tensor.name}' points outside the model folder ('{location}')",
                                fix="keep external data files beside the model")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    shape = tuple(tensor.dims)
    offset, size = int(info.get("offset", 0)), math.prod(shape) * dtype.itemsize
    if not path.is_file() or path.stat().st_size < offset + size:
        raise ExternalDataError(f"external data of '{tensor.name}' is missing or too short: {path}",
                                fix="copy the model together with its external data file")
    if size == 0:
        return np.zeros(shape, dtype)
    mapped = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    return mapped if offset % dtype.itemsize == 0 else np.array(mapped)  # ORT wants aligned data


def _needed_nodes(graph: onnx.GraphProto, outputs: Sequence[str]) -> list[onnx.NodeProto]:
    """Nodes that the outputs depend on, in graph order (the rest is not computed)."""
    producer = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
    needed: set[int] = set()
    pending = [producer[name] for name in outputs if name in producer]
    while pending:
        index = pending.pop()
        if index in needed:
            continue
        needed.add(index)
        pending.extend(producer[name] for name in _node_reads(graph.node[index]) if name in producer)
    return [node for index, node in enumerate(graph.node) if index in needed]


def _node_reads(node: onnx.NodeProto) -> list[str]:
    """The node's inputs plus every name its subgraphs read (over-approximates outer-scope use)."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        for subgraph in [*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs]:
            for inner in subgraph.node:
                names.extend(_node_reads(inner))
    return names


class _FloatModel:
    """The float model ready to run with extra outputs; weights held once (see module notes)."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path | None, threads: int):
        fed = {t.name for t in model.graph.initializer if _is_feedable_weight(t)}
        self.weights = {t.name: _weight_array(t, base_dir) for t in model.graph.initializer if t.name in fed}
        self.shell = _weight_less_graph(model, fed, base_dir)
        self.graph_inputs = {value.name for value in self.shell.graph.input} - set(self.weights)
        self.threads = threads

    def runner(self, outputs: Sequence[str]) -> Callable[[Feed], list[np.ndarray]]:
        """A function feed -> arrays of `outputs` (graph inputs are passed through)."""
        computed = [name for name in outputs if name not in self.graph_inputs]
        session = self._session(computed) if computed else None

        def run(feed: Feed) -> list[np.ndarray]:
            fetched = session.run(computed, {**feed, **self.weights}) if session else []
            values = dict(zip(computed, fetched, strict=True))
            return [feed[name] if name in self.graph_inputs else values[name] for name in outputs]

        return run

    def _session(self, outputs: Sequence[str]) -> ort.InferenceSession:
        model = onnx.ModelProto()
        model.CopyFrom(self.shell)  # small: no weights
        graph = model.graph
        nodes = _needed_nodes(graph, outputs)
        graph.ClearField("node")
        graph.node.extend(nodes)
        graph.ClearField("output")
        graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)  # ORT infers types
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises its own unrelated types
            raise ModelLoadError(f"ONNX Runtime cannot run the model for calibration: {exc}",
                                 fix="check that onnxruntime runs the float model as it is") from exc


def _check_tensor_names(graph: onnx.GraphProto, tensors: Sequence[str]) -> list[str]:
    weights = {t.name for t in graph.initializer}
    known = {name for node in graph.node for name in node.output if name}
    known |= {value.name for value in graph.input if value.name not in weights}
    if isinstance(tensors, str):
        raise OptionError(f"tensors='{tensors}' is one string", fix="pass a list of tensor names")
    tensors = list(tensors)
    if not tensors:
        raise OptionError("no tensors to calibrate", fix="pass a list of tensor names (see float_activation_names)")
    for name in tensors:
        if name in weights:
            raise OptionError(f"'{name}' is a weight (initializer), not an activation",
                              fix="calibrate activations; weights are quantized from their values")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "see float_activation_names(model)"
            raise OptionError(f"'{name}' is not a tensor of the model's main graph", fix=hint)
    return list(dict.fromkeys(tensors))


def float_activation_names(model: ModelLike) -> list[str]:
    """Every float graph input and node output of the main graph (not weights, not Constant
    outputs), in graph order. Types come from ONNX shape inference; a tensor whose type
    cannot be inferred is left out."""
    proto, _ = _load_model(model)
    graph = proto.graph
    fed = {t.name for t in graph.initializer if _is_feedable_weight(t)}
    shell = _weight_less_graph_types_only(proto, fed)
    try:
        inferred = onnx.shape_inference.infer_shapes(shell, strict_mode=False).graph
    except Exception:  # noqa: BLE001 - inference is best effort; declared types remain
        inferred = shell.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.input, *inferred.value_info, *inferred.output)}
    weights = {t.name for t in graph.initializer}
    candidates = [v.name for v in graph.input if v.name not in weights]
    candidates += [name for node in graph.node if node.op_type != "Constant" for name in node.output if name]
    return [name for name in dict.fromkeys(candidates) if types.get(name) in _FLOAT_TYPES]


def _weight_less_graph_types_only(model: onnx.ModelProto, fed: set[str]) -> onnx.ModelProto:
    """Like _weight_less_graph, for shape inference only: external tensors stay references."""
    return _weight_less_graph(model, fed | {t.name for t in model.graph.initializer
                                            if t.data_location == TensorProto.EXTERNAL}, None)


# --------------------------------------------------------------------------------------------
# Entry point.

def calibrate(model: ModelLike, data: Any, tensors: Sequence[str],
              options: CalibrationOptions = CalibrationOptions()) -> CalibrationResult:
    """Statistics of `tensors` over the samples of `data` (anything `open_source` takes)."""
    proto, base_dir = _load_model(model)
    source = open_source(data, proto)
    names = _check_tensor_names(proto.graph, tensors)
    float_model = _FloatModel(proto, base_dir, options.threads)
    del proto  # a model loaded here from a path is freed before the long loop
    accumulators = {name: _TensorAccumulator(name, options) for name in names}
    groups = _output_groups(names, options.outputs_per_run)
    with _progress(len(source) * len(groups), options.progress) as advance:
        for group in groups:
            run = float_model.runner(group)
            for feed in source:
                values = run(feed)
                for name in group:
                    accumulators[name].update(values.pop(0))  # drop each array once counted
                advance()
            del run  # the group's session goes before the next one is made
    return CalibrationResult({name: acc.finish() for name, acc in accumulators.items()},
                             len(source), options.histogram_bins)


def _output_groups(names: Sequence[str], size: int | None) -> list[list[str]]:
    size = size or len(names)
    return [list(names[start:start + size]) for start in range(0, len(names), size)]


@contextmanager
def _progress(total: int, show: bool | None) -> Iterator[Callable[[], None]]:
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        yield lambda: None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc="calibrating", unit="run", file=sys.stderr) as bar:
        yield lambda: bar.update(1)
