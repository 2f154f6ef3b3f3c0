"""The streaming power-of-two-grid histogram: exact on its grid, whatever the order and blocks."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.calibration.histogram import Histogram, StreamingHistogram


def _histogram_in_blocks(blocks: list[np.ndarray]) -> Histogram:
    stream = StreamingHistogram(256)
    for block in blocks:
        if block.size:
            stream.add(block.astype(np.float64), float(block.min()), float(block.max()))
    return stream.result()


@pytest.mark.parametrize("seed", range(5))
def test_histogram_is_independent_of_order_and_blocks(seed):
    rng = np.random.default_rng(seed)
    rest = np.concatenate([rng.normal(0, 1e-6, 100), rng.standard_cauchy(1000),
                           [-1e-30, 5e-39, 3.0]]).astype(np.float32)
    zeros = np.zeros(7, np.float32)
    whole = _histogram_in_blocks([np.concatenate([rest, zeros])])
    cuts = np.sort(rng.choice(np.arange(1, rest.size), 20, replace=False))
    streamed = _histogram_in_blocks([zeros, *np.split(rng.permutation(rest), cuts)])  # zeros first
    assert (streamed.exponent, streamed.first_bin) == (whole.exponent, whole.first_bin)
    np.testing.assert_array_equal(streamed.counts, whole.counts)
    assert whole.counts.sum() == rest.size + 7 and whole.counts[0] and whole.counts[-1]
    assert 128 <= len(whole.counts) <= 256


def test_histogram_equals_numpy_on_its_grid(mlp_case):
    _, _, result, reference = mlp_case
    for name, values in reference.items():
        hist = result[name].histogram
        counts, _ = np.histogram(values.astype(np.float64), bins=hist.edges())
        np.testing.assert_array_equal(hist.counts, counts, err_msg=name)
        assert 4096 // 2 <= len(hist.counts) <= 4096  # the grid keeps at least half the bins


def test_magnitude_and_side_counts_fold_the_grid_about_zero():
    values = np.random.default_rng(0).normal(0, 1, 1000)  # no value on a bin edge
    hist = _histogram_in_blocks([values])
    edges = np.ldexp(np.arange(len(hist.magnitude_counts()) + 1, dtype=np.float64), hist.exponent)
    np.testing.assert_array_equal(hist.magnitude_counts(), np.histogram(np.abs(values), edges)[0])
    negative, positive = hist.side_counts(negative=True), hist.side_counts(negative=False)
    assert negative.sum() == (values < 0).sum() and positive.sum() == (values >= 0).sum()
    np.testing.assert_array_equal(negative, np.histogram(-values[values < 0], edges[:len(negative) + 1])[0])


def test_result_is_read_only():
    hist = _histogram_in_blocks([np.array([1.0, 2.0])])
    with pytest.raises(ValueError):
        hist.counts[0] = 5
