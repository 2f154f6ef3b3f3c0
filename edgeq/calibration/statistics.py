"""Statistics of calibrated tensors: `TensorStats` per tensor, `CalibrationResult` for a run with
its .npz persistence ("edgeq.calibration/1"), and `TensorAccumulator`, which streams one
tensor's values into its `TensorStats`.

Per tensor the accumulator keeps running min/max (per tensor and, when asked, per channel), a
`StreamingHistogram` of at most `histogram_bins` int64 counts and two counters, whatever the
number of samples. All statistics are exact (min/max, integer counts), so the same values give
the same result bit for bit. Non-finite values (e.g. a -inf attention mask) are counted in
`nonfinite` and left out of min/max/histograms.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeq.calibration.histogram import Histogram, StreamingHistogram
from edgeq.calibration.ranges import RangeMethod, check_range_args, histogram_range, range_method, with_zero
from edgeq.errors import CalibrationError, OptionError

_FORMAT = "edgeq.calibration/1"
_BLOCK = 1 << 20  # values per block: bounds the float64/int64 temporaries of one update


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
        method = range_method(method)
        check_range_args(percentile, num_bits)
        if self.count == 0:
            raise CalibrationError(f"tensor '{self.name}' had no finite values in calibration",
                                   fix="leave it unquantized or check the data")
        if method is RangeMethod.MINMAX:
            lo, hi = self.min, self.max
        elif self.histogram is None:
            raise OptionError(f"range '{method.value}' of '{self.name}' needs a histogram",
                              fix="collect with CollectionOptions(histogram=True)")
        else:
            lo, hi = histogram_range(method, self.histogram, self.min, self.max, symmetric,
                                     percentile=percentile, num_bits=num_bits)
        return with_zero(lo, hi, symmetric)

    def channel_range(self, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel min/max ranges (containing 0), along `channel_axis`."""
        if self.channel_min is None or self.channel_max is None:
            raise OptionError(f"tensor '{self.name}' has no per-channel statistics",
                              fix="collect with CollectionOptions(channel_axis=...)")
        lo, hi = np.minimum(self.channel_min, 0.0), np.maximum(self.channel_max, 0.0)
        if symmetric:
            limit = np.maximum(-lo, hi)
            return -limit, limit
        return lo, hi


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


# --------------------------------------------------------------------------------------------
# The .npz layout: arrays "<index>/<field>" per tensor, in request order.

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


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


# --------------------------------------------------------------------------------------------
# Accumulating one tensor.

class TensorAccumulator:
    """Streams the values of tensor `name`, sample by sample, into its `TensorStats`.

    histogram_bins: keep a histogram of at most this many bins (None: no histogram).
    channel_axis: also keep min/max per channel along this axis; rank-0 values get none.
    """

    def __init__(self, name: str, histogram_bins: int | None, channel_axis: int | None):
        self.name = name
        self.requested_axis = channel_axis
        self.histogram = StreamingHistogram(histogram_bins) if histogram_bins is not None else None
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
