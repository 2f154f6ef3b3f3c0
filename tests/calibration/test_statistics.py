"""Tensor statistics: exact min/max, counts and per-channel ranges, non-finite values apart, and
the .npz persistence format "edgeq.calibration/1"."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from edgeq.calibration.collection import CollectionOptions, calibrate
from edgeq.calibration.statistics import CalibrationResult, TensorAccumulator
from edgeq.errors import CalibrationError, OptionError
from tests.calibration.helpers import MLP_TENSORS, assert_same_stats, mlp_samples
from tests.calibration.models import identity, mlp, mlp_reference


def test_min_max_and_counts_are_exact(mlp_case):
    _, _, result, reference = mlp_case
    assert list(result) == MLP_TENSORS and result.num_samples == 12
    for name, values in reference.items():
        stats = result[name]
        assert (stats.min, stats.max) == (float(values.min()), float(values.max())), name
        assert stats.count == values.size and stats.nonfinite == 0 and stats.dtype == "float32"


def test_per_channel_min_max(mlp_case):
    _, samples, result, _ = mlp_case
    model = mlp()
    hidden = np.concatenate([mlp_reference(model, s["x"])["r"] for s in samples])
    stats = result["r"]
    assert stats.channel_axis == 1
    np.testing.assert_allclose(stats.channel_min, hidden.min(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.channel_max, hidden.max(axis=0), rtol=1e-5, atol=1e-5)
    assert stats.channel_max.max() == stats.max and stats.channel_min.min() == stats.min
    lo, hi = stats.channel_range(symmetric=True)
    np.testing.assert_array_equal(hi, -lo)
    assert (hi >= 0).all()


def test_per_channel_along_the_batch_axis_is_exact():
    samples = mlp_samples(5, rows=3)
    result = calibrate(mlp(), samples, ["x"], CollectionOptions(channel_axis=0, histogram=False))
    stacked = np.stack([s["x"] for s in samples])  # [sample, row, 32]
    np.testing.assert_array_equal(result["x"].channel_min, stacked.min(axis=(0, 2)))
    np.testing.assert_array_equal(result["x"].channel_max, stacked.max(axis=(0, 2)))
    assert result["x"].histogram is None


def test_channel_count_must_not_change():
    with pytest.raises(CalibrationError, match="'x' has 2 channels on axis 0"):
        calibrate(mlp(), mlp_samples(3), ["x"], CollectionOptions(channel_axis=0))


def test_all_zero_tensor():
    result = calibrate(identity(), [{"x": np.zeros(10, np.float32)}], ["x"])
    stats = result["x"]
    assert (stats.min, stats.max, stats.count) == (0.0, 0.0, 10)
    assert list(stats.histogram.counts) == [10]
    for method in ["minmax", "percentile", "entropy", "mse"]:
        assert stats.range(method) == (0.0, 0.0)


def test_non_finite_activations_are_counted_apart():
    graph = helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "log",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = calibrate(model, [{"x": np.array([0, 1, np.e, 0], np.float32)}], ["y"],
                       CollectionOptions(channel_axis=0))
    stats = result["y"]
    assert (stats.count, stats.nonfinite, stats.min) == (2, 2, 0.0)
    assert stats.max == pytest.approx(1.0)
    assert np.isnan(stats.channel_min[0]) and stats.channel_min[1] == 0.0


def test_accumulator_streams_blocks_like_one_array():
    """Values fed in several updates give the statistics of all of them at once."""
    values = np.random.default_rng(2).normal(0, 3, (6, 40)).astype(np.float32)
    whole, parts = TensorAccumulator("t", 64, -1), TensorAccumulator("t", 64, -1)
    whole.update(values)
    for row in np.split(values, 3):
        parts.update(row)
    a, b = whole.finish(), parts.finish()
    assert (a.min, a.max, a.count) == (b.min, b.max, b.count) == (float(values.min()), float(values.max()), 240)
    np.testing.assert_array_equal(a.histogram.counts, b.histogram.counts)
    np.testing.assert_array_equal(b.channel_max, values.max(axis=0))


def test_histogram_ranges_need_histograms():
    result = calibrate(mlp(), mlp_samples(2), ["h"], CollectionOptions(histogram=False))
    assert result["h"].range("minmax")[1] == result["h"].max
    with pytest.raises(OptionError, match="needs a histogram"):
        result["h"].range("entropy")
    with pytest.raises(OptionError, match="unknown range method"):
        result["h"].range("kl")
    with pytest.raises(OptionError, match="no per-channel statistics"):
        result["h"].channel_range()


# --- persistence ----------------------------------------------------------------------------

def test_save_and_load_round_trip(mlp_case, tmp_path):
    result = mlp_case[2]
    result.save(tmp_path / "stats.npz")
    loaded = CalibrationResult.load(tmp_path / "stats.npz")
    assert_same_stats(result, loaded)
    for method in ["minmax", "percentile", "entropy", "mse"]:
        assert loaded.ranges(method, True) == result.ranges(method, True)
    with pytest.raises(ValueError):
        loaded["x"].histogram.counts[0] = 1  # frozen arrays


def test_saved_file_layout_is_format_1(mlp_case, tmp_path):
    """The on-disk layout other tools read: one array per field, keyed '<index>/<field>'."""
    result = mlp_case[2]
    result.save(tmp_path / "stats.npz")
    with np.load(tmp_path / "stats.npz", allow_pickle=False) as data:
        assert str(data["format"]) == "edgeq.calibration/1"
        assert list(data["names"]) == MLP_TENSORS
        assert int(data["num_samples"]) == 12 and int(data["histogram_bins"]) == 4096
        fields = {"dtype", "counts", "minmax", "hist_grid", "hist_counts", "channel_axis", "channel_min",
                  "channel_max"}
        assert set(data.files) == {"format", "names", "num_samples", "histogram_bins"} | {
            f"{i}/{f}" for i in range(len(MLP_TENSORS)) for f in fields}
        h = result["h"]
        np.testing.assert_array_equal(data["1/counts"], [h.count, h.nonfinite])
        np.testing.assert_array_equal(data["1/minmax"], [h.min, h.max])
        np.testing.assert_array_equal(data["1/hist_grid"], [h.histogram.exponent, h.histogram.first_bin])


def test_load_rejects_other_files(tmp_path):
    np.savez(tmp_path / "other.npz", a=np.ones(3))
    with pytest.raises(CalibrationError, match="not an edgeq calibration file"):
        CalibrationResult.load(tmp_path / "other.npz")
