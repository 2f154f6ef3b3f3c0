"""Calibration results shared by the calibration tests (computed once per test package)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.calibration.collection import CollectionOptions, calibrate
from tests.calibration.helpers import MLP_TENSORS, float_values, mlp_samples
from tests.calibration.models import identity, mlp


@pytest.fixture(scope="package")
def mlp_case():
    """(model, samples, statistics of every mlp tensor with channels on -1, their float values)."""
    model, samples = mlp(), mlp_samples(12)
    result = calibrate(model, samples, MLP_TENSORS, CollectionOptions(channel_axis=-1))
    return model, samples, result, float_values(model, samples, MLP_TENSORS)


@pytest.fixture(scope="package")
def gaussian_with_outliers():
    """(statistics of x -> Identity -> y for 10 x 100k N(0, 1) values plus +-100, those values)."""
    rng = np.random.default_rng(7)
    samples = [{"x": rng.normal(0, 1, 100_000).astype(np.float32)} for _ in range(10)]
    samples[3]["x"][17] = 100.0
    samples[8]["x"][5] = -100.0
    values = np.concatenate([s["x"] for s in samples]).astype(np.float64)
    return calibrate(identity(), samples, ["x", "y"]), values
