"""--calib-method: "auto" (the default) takes percentile ranges for 8-bit activations and min/max
for 16-bit ones; a method named explicitly is used at every width (it used to be replaced by
min/max at 16 bits even when asked for)."""

from __future__ import annotations

import pytest

import edgeq
from edgeq.errors import OptionError
from edgeq.options import CalibrationOptions, CompileOptions, range_method
from edgeq.pipeline.artifacts import ACTIVATION_RANGES
from tests.passes.helpers import ptq_context, ptq_pipeline


def test_auto_is_percentile_at_8_bits_and_minmax_above():
    assert range_method("auto", 8) == "percentile" and range_method("auto", 16) == "minmax"
    for method in ("minmax", "percentile", "entropy", "mse"):
        assert range_method(method, 8) == range_method(method, 16) == method
    assert CalibrationOptions().method == "auto"


def _ranges(path, feeds, method: str) -> dict[str, tuple[float, float]]:
    options = CompileOptions(activations="int16", calibration=CalibrationOptions(method=method, percentile=99.0))
    ctx = ptq_context("x86-vnni", path, feeds)
    ptq_pipeline("x86-vnni", options, stop_after="calibrate")(edgeq.load(path), ctx)
    return ctx.artifacts[ACTIVATION_RANGES]


def test_an_explicit_percentile_is_honoured_for_16_bit_activations(synthetic_bert, bert_samples):
    auto = _ranges(synthetic_bert, bert_samples, "auto")
    minmax = _ranges(synthetic_bert, bert_samples, "minmax")
    percentile = _ranges(synthetic_bert, bert_samples, "percentile")
    assert auto == minmax  # 16-bit activations: auto is min/max
    # percentile 99 clips: every range is within min/max's, and most are strictly narrower
    narrower = [name for name in minmax if percentile[name][1] - percentile[name][0] < minmax[name][1] - minmax[name][0]]
    assert all(percentile[n][1] - percentile[n][0] <= minmax[n][1] - minmax[n][0] + 1e-9 for n in minmax)
    assert len(narrower) > len(minmax) // 2


def test_the_report_says_which_method_auto_took(synthetic_bert, bert_samples):
    for activations, expected in (("int8", "percentile 99.999 (auto: 8-bit activations)"),
                                  ("int16", "minmax (auto: 16-bit activations)")):
        compiled = edgeq.compile(synthetic_bert, "x86-vnni", CompileOptions(activations=activations),
                                 calibration=bert_samples)
        assert compiled.report.settings["activation ranges"] == expected
    compiled = edgeq.compile(synthetic_bert, "x86-vnni", CompileOptions(
        activations="int16", calibration=CalibrationOptions(method="percentile")), calibration=bert_samples)
    assert compiled.report.settings["activation ranges"] == "percentile 99.999"


def test_an_unknown_method_is_refused():
    with pytest.raises(OptionError, match="--calib-method"):
        CompileOptions(calibration=CalibrationOptions(method="median"))
