"""int4 presets on a small calibration set (issue 16): GPTQ's layer statistics need about
`WANTED_TOKENS` tokens, so token windows are extended by more windows of the same text and split
again (the compile `--samples N` gives), and other data gets a note with the number of samples to
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


def test_token_windows_are_extended_to_what_samples_n_gives(synthetic_llama, wanted_160):
    """6 windows given (4 calibrate, 2 held out) and 160 tokens wanted: 6 more windows are drawn and
    the 12 split again, so windows 0..9 calibrate and 10..11 are held out, exactly as a compile
    given 12 windows (the same model, the same held-out samples)."""
    ids = np.random.default_rng(0).integers(0, 100, 4000)
    result = compile_model(synthetic_llama, "x86-vnni", W4A16, calibration=TokenWindows(ids, 16, 6))
    record = result.report.calibration
    assert record["calibration_samples"] == 10
    assert record["held_out"] == ["token window 10", "token window 11"]
    (note,) = [n for n in result.report.notes if "GPTQ" in n]
    assert "6 more windows of the same text were drawn: windows 0..9 calibrate and 10..11 are held out" in note
    assert "as --samples 12 gives" in note
    assert {p.name: p.stats for p in result.report.passes}["gptq"]["layers"] > 0
    given_12 = compile_model(synthetic_llama, "x86-vnni", W4A16, calibration=TokenWindows(ids, 16, 12))
    assert given_12.report.calibration["held_out"] == record["held_out"]
    assert not [n for n in given_12.report.notes if "GPTQ" in n]
    assert _without_metadata(result.graph) == _without_metadata(given_12.graph)


def _without_metadata(graph) -> bytes:
    from edgeq.ir import to_model_proto

    model = to_model_proto(graph)
    del model.metadata_props[:]
    return model.SerializeToString(deterministic=True)


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
