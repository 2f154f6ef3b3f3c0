"""Range methods over calibration statistics: percentile within a bin of numpy's, entropy and
MSE clipping outliers on a known distribution, zero always inside."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.calibration.collection import calibrate
from edgeq.calibration.histogram import StreamingHistogram
from edgeq.calibration.ranges import RangeMethod, histogram_range, range_method, with_zero
from edgeq.errors import OptionError
from tests.calibration.models import identity


@pytest.mark.parametrize("percentile", [99.0, 99.9, 99.99])
def test_percentiles_match_numpy_within_a_bin(mlp_case, percentile):
    """The histogram's quantile lies in the bin of the order statistic numpy picks."""
    _, _, result, reference = mlp_case

    def order_statistic(values: np.ndarray, q: float) -> float:
        return float(np.sort(values)[max(int(np.ceil(q * values.size)) - 1, 0)])

    for name in ["x", "h", "y"]:
        values, stats = reference[name], result[name]
        width = stats.histogram.width
        tail = (100 - percentile) / 200
        lo, hi = stats.range("percentile", percentile=percentile)
        assert lo == pytest.approx(min(order_statistic(values, tail), 0), abs=width)
        assert hi == pytest.approx(max(order_statistic(values, 1 - tail), 0), abs=width)
        neg, pos = stats.range("percentile", symmetric=True, percentile=percentile)
        assert pos == -neg == pytest.approx(order_statistic(np.abs(values), percentile / 100), abs=width)


def test_ranges_always_contain_zero(mlp_case):
    result = mlp_case[2]
    for method in ["minmax", "percentile", "entropy", "mse"]:
        for symmetric in (False, True):
            for name, (lo, hi) in result.ranges(method, symmetric).items():
                assert lo <= 0 <= hi, (method, name)
                if symmetric:
                    assert lo == -hi
    assert result["r"].range("minmax") == (0.0, result["r"].max)


def _fake_quant_mse(values: np.ndarray, lo: float, hi: float, symmetric: bool) -> float:
    if symmetric:
        scale = hi / 127
        quantized = np.clip(np.round(values / scale), -127, 127) * scale
    else:
        scale = (hi - lo) / 255
        zero_point = np.round(-lo / scale)
        quantized = (np.clip(np.round(values / scale) + zero_point, 0, 255) - zero_point) * scale
    return float(np.mean((values - quantized) ** 2))


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_range_is_near_the_true_optimum(gaussian_with_outliers, symmetric):
    result, values = gaussian_with_outliers
    lo, hi = result["y"].range("mse", symmetric)
    assert 2.5 < hi < 50 and lo < 0  # clips the two outliers at +-100
    ours = _fake_quant_mse(values, lo, hi, symmetric)
    grid = np.linspace(0.02, 1, 200)  # shrink factors of [-100, 100]
    best = min(_fake_quant_mse(values, -100 * s, 100 * s, symmetric) for s in grid)
    assert ours <= 1.05 * best
    assert ours < 0.5 * _fake_quant_mse(values, -100, 100, symmetric)


def test_entropy_and_percentile_clip_outliers(gaussian_with_outliers):
    stats = gaussian_with_outliers[0]["y"]
    assert (stats.min, stats.max) == (-100.0, 100.0)
    lo, hi = stats.range("entropy", symmetric=True)
    assert 2.5 < hi < 10  # well inside the outliers, beyond the Gaussian's bulk
    lo, hi = stats.range("entropy")
    assert -10 < lo < -2.5 and 2.5 < hi < 10
    _, p9999 = stats.range("percentile", symmetric=True, percentile=99.99)
    assert 3.5 < p9999 < 4.5  # |N(0,1)| 99.99th percentile is 3.89


def test_mse_keeps_the_range_of_a_uniform_tensor():
    rng = np.random.default_rng(3)
    result = calibrate(identity(), [{"x": rng.uniform(-1, 1, 50_000).astype(np.float32)}], ["x"])
    lo, hi = result["x"].range("mse", symmetric=True)
    assert 0.98 < hi <= 1.0


def test_one_sided_entropy_uses_all_levels():
    rng = np.random.default_rng(5)
    result = calibrate(identity(), [{"x": np.abs(rng.normal(0, 1, 200_000)).astype(np.float32)}], ["x"])
    lo, hi = result["x"].range("entropy")
    assert lo == 0 and 2 < hi <= result["x"].max


def test_histogram_ranges_stay_inside_the_data_range():
    """Used on a histogram alone, every method keeps within [lo, hi] of the values it is given."""
    values = np.random.default_rng(11).normal(0.5, 1, 20_000)
    stream = StreamingHistogram(512)
    stream.add(values, float(values.min()), float(values.max()))
    lo, hi = float(values.min()), float(values.max())
    for method in (RangeMethod.PERCENTILE, RangeMethod.ENTROPY, RangeMethod.MSE):
        for symmetric in (False, True):
            low, high = histogram_range(method, stream.result(), lo, hi, symmetric, percentile=99.9, num_bits=8)
            if symmetric:
                assert low == -high and 0 < high <= max(-lo, hi), method
            else:
                assert lo <= low < 0 < high <= hi, method


def test_range_method_names_and_zero():
    assert range_method("mse") is RangeMethod.MSE
    with pytest.raises(OptionError, match="unknown range method 'kl'"):
        range_method("kl")
    assert with_zero(0.5, 2.0, False) == (0.0, 2.0)
    assert with_zero(-3.0, 2.0, True) == (-3.0, 3.0)


@pytest.mark.parametrize("values", [np.full(10, 0.7), np.full(10, -3.0), np.linspace(1000.0, 1000.001, 50)])
@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_data_far_from_zero_gets_a_range_without_a_dense_fold(values, method):
    """A constant tensor (sin of one position) lands one bin 2**40 widths from 0: folding it
    densely about 0 would allocate terabytes; the range methods coarsen it first."""
    from edgeq.calibration.statistics import TensorAccumulator

    accumulator = TensorAccumulator("t", 4096, None)
    accumulator.update(values.astype(np.float32))
    stats = accumulator.finish()
    amax = float(np.abs(values).max())
    lo, hi = stats.range(method, symmetric=True, percentile=99.999, num_bits=8)
    assert hi == -lo and amax * 0.999 <= hi <= amax * 1.001
