"""Shared helpers of the calibration tests: samples for the `mlp` model, its tensors' values as
calibration computes them, and a field-by-field comparison of two results."""

from __future__ import annotations

import numpy as np
import onnx

from edgeq.calibration.float_model import FloatModel
from edgeq.calibration.statistics import CalibrationResult

MLP_TENSORS = ["x", "h", "r", "m", "y"]


def mlp_samples(count: int, seed: int = 0, rows: int | None = None) -> list[dict[str, np.ndarray]]:
    """Feeds for `models.mlp`: x [rows, 32] with a spread that changes from sample to sample."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1 + i % 3, size=(rows or 1 + i % 4, 32)).astype(np.float32)}
            for i in range(count)]


def float_values(model: onnx.ModelProto, samples, names) -> dict[str, np.ndarray]:
    """Every value of each tensor over all samples, as calibration's ONNX Runtime session computes
    them (weights fed as inputs), kept in full for numpy."""
    run = FloatModel(model, None, threads=1).runner(names)
    runs = [run(sample) for sample in samples]
    return {name: np.concatenate([values[i].ravel() for values in runs]) for i, name in enumerate(names)}


def assert_same_stats(a: CalibrationResult, b: CalibrationResult) -> None:
    assert list(a) == list(b) and a.num_samples == b.num_samples
    for name in a:
        x, y = a[name], b[name]
        assert (x.min, x.max, x.count, x.nonfinite, x.dtype, x.channel_axis) == \
               (y.min, y.max, y.count, y.nonfinite, y.dtype, y.channel_axis), name
        assert (x.histogram is None) == (y.histogram is None)
        if x.histogram is not None:
            assert (x.histogram.exponent, x.histogram.first_bin) == (y.histogram.exponent, y.histogram.first_bin)
            np.testing.assert_array_equal(x.histogram.counts, y.histogram.counts)
        for field in ("channel_min", "channel_max"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field))
