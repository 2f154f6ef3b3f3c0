"""Verification against float: the error measures on known arrays, and compare_with_float
running both models and accumulating over samples."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from edgeq.runtime.verification import compare_with_float, output_errors, row_cosines
from tests.runtime.models import affine


def test_measures_on_known_arrays():
    ref = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
    cand = np.array([[3.0, 4.0], [0.0, 1.0]], np.float32)
    (error,) = output_errors(["y"], [[ref]], [[cand]])
    assert error.name == "y"
    assert error.max_abs == 1.0 and error.mean_abs == 0.5
    assert error.relative_l2 == pytest.approx(math.sqrt(2 / 26))
    assert error.sqnr_db == pytest.approx(10 * math.log10(13))
    assert (error.cosine_min, error.cosine_mean) == (pytest.approx(0.0), pytest.approx(0.5))


def test_identical_outputs():
    ref = np.arange(12, dtype=np.float32).reshape(3, 4)
    (error,) = output_errors(["y"], [[ref]], [[ref.copy()]])
    assert (error.max_abs, error.relative_l2, error.sqnr_db) == (0.0, 0.0, float("inf"))
    assert error.cosine_min == pytest.approx(1.0)


def test_row_cosines_are_per_last_axis_and_skip_zero_rows():
    ref = np.array([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [2.0, 0.0]]])
    cand = np.array([[[0.0, 1.0], [5.0, 5.0]], [[2.0, 2.0], [-1.0, 0.0]]])
    assert row_cosines(ref, cand) == pytest.approx([0.0, 1.0, -1.0])
    assert row_cosines(np.float64(1.0), np.float64(1.0)) == []


def test_compare_with_float_accumulates_over_samples(tmp_path: Path):
    """compiled = float + 1 on x = 1 then x = 3 (4 elements each): the relative L2 error is
    sqrt(sum of squared errors / sum of squared references) over both samples, not a mean of
    per-sample ratios."""
    float_model = affine(tmp_path / "float.onnx", 1.0)
    compiled = affine(tmp_path / "compiled.onnx", 1.0, 1.0)
    feeds = [{"x": np.full((1, 4), v, np.float32)} for v in (1.0, 3.0)]
    result = compare_with_float(float_model, compiled, feeds, threads=1, synthetic=True)
    assert (result.samples, result.synthetic_inputs) == (2, True)
    (error,) = result.outputs
    assert error.name == "y" and error.max_abs == 1.0
    assert error.relative_l2 == pytest.approx(math.sqrt(8 / 40))
    assert error.sqnr_db == pytest.approx(10 * math.log10(5))
    assert result.worst_relative_l2 == error.relative_l2


def test_a_scaled_model_has_the_scale_error_and_full_cosine(tmp_path: Path):
    feeds = [{"x": np.array([[1.0, -2.0, 3.0, 0.5]], np.float32)}]
    result = compare_with_float(affine(tmp_path / "f.onnx", 1.0), affine(tmp_path / "c.onnx", 1.1), feeds)
    (error,) = result.outputs
    assert error.relative_l2 == pytest.approx(0.1, rel=1e-5)
    assert error.sqnr_db == pytest.approx(20.0, rel=1e-4)
    assert error.cosine_min == pytest.approx(1.0)
