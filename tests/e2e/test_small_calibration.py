"""int4 presets on a small calibration set (issue 16): GPTQ's layer statistics need about
`WANTED_TOKENS` tokens, so token windows are extended by more windows of the same text (after
the held-out ones, which stay apart), and other data gets a note with the number of samples to
give."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.calibration.sources import TokenWindows
from edgeq.compiler import compile as compile_model
from edgeq.options import CompileOptions

W4A16 = CompileOptions(weights="int4", group=32, activations="float", verify=False, threads=1)


@pytest.fixture
def wanted_160(monkeypatch):
    import edgeq.passes.gptq as gptq

    monkeypatch.setattr(gptq, "WANTED_TOKENS", 160)  # 10 windows of 16 tokens


def test_token_windows_are_extended_after_the_held_out_ones(synthetic_llama, wanted_160):
    ids = np.random.default_rng(0).integers(0, 100, 4000)
    result = compile_model(synthetic_llama, "x86-vnni", W4A16, calibration=TokenWindows(ids, 16, 6))
    record = result.report.calibration
    assert record["calibration_samples"] == 10                       # 4 given + 6 drawn
    assert record["held_out"] == ["token window 4", "token window 5"]  # still the user's last two
    (note,) = [n for n in result.report.notes if "GPTQ" in n]
    assert "6 more windows of the same text were drawn (windows 6..11" in note and "--samples 12" in note
    assert {p.name: p.stats for p in result.report.passes}["gptq"]["layers"] > 0


def test_enough_windows_are_left_alone(synthetic_llama, wanted_160):
    ids = np.random.default_rng(0).integers(0, 100, 4000)
    result = compile_model(synthetic_llama, "x86-vnni", W4A16, calibration=TokenWindows(ids, 16, 12))
    assert result.report.calibration["calibration_samples"] == 10
    assert not [n for n in result.report.notes if "GPTQ" in n]


def test_other_data_gets_the_number_of_samples_to_give(synthetic_llama, llama_samples, wanted_160):
    result = compile_model(synthetic_llama, "x86-vnni", W4A16, calibration=llama_samples)
    (note,) = [n for n in result.report.notes if "GPTQ" in n]
    assert "the 6 calibration samples give 96" in note and "give about 10 samples of 16 tokens" in note


def test_presets_without_gptq_want_nothing(synthetic_llama, llama_samples, wanted_160):
    result = compile_model(synthetic_llama, "x86-vnni", CompileOptions(verify=False, threads=1),
                           calibration=llama_samples)
    assert not [n for n in result.report.notes if "GPTQ" in n]
