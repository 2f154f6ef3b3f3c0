"""A decoder with a KV cache calibrates on windows as one without does (issue 15): each window
gives a prefill and decode steps, the held-out samples are whole windows (the last ones, as
`--samples N` sets aside without a cache), and an int4 preset's windows are extended to GPTQ's
wanted tokens the same way, so the cache graph's GPTQ sees the full-sequence graph's windows."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.calibration.sources import TokenWindows
from edgeq.compiler import compile as compile_model
from edgeq.models import synthetic
from edgeq.options import CompileOptions

W4A16 = CompileOptions(weights="int4", group=32, activations="float", verify=False, threads=1)


@pytest.fixture(scope="module")
def llama_kv(tmp_path_factory):
    return synthetic.build_llama_file(tmp_path_factory.mktemp("kvwin") / "llama_kv.onnx", kv_cache=True)


@pytest.fixture
def wanted_160(monkeypatch):
    from edgeq.passes import gptq

    monkeypatch.setattr(gptq, "WANTED_TOKENS", 160)  # 10 windows of 16 tokens


def test_cache_windows_are_held_out_whole_and_extended(llama_kv, wanted_160):
    ids = np.random.default_rng(0).integers(0, synthetic.TINY_LLAMA.vocab_size, 4000)
    windows = TokenWindows(ids, 16, 6, decode_steps=2)  # a prefill of 14 tokens and 2 decode steps each
    result = compile_model(str(llama_kv), "x86-vnni", W4A16, calibration=windows)
    record = result.report.calibration
    steps = ("prefill", "decode step 1", "decode step 2")
    assert record["held_out"] == [f"token window {w} {s}" for w in (10, 11) for s in steps]
    assert record["calibration_samples"] == 10 * len(steps)
    (note,) = [n for n in result.report.notes if "GPTQ" in n]
    assert "6 more windows of the same text were drawn: windows 0..9 calibrate and 10..11 are held out" in note
    assert "4 calibration windows give 64" in note and "as --samples 12 gives" in note
    given_12 = compile_model(str(llama_kv), "x86-vnni", W4A16,
                             calibration=TokenWindows(ids, 16, 12, decode_steps=2))
    assert given_12.report.calibration["held_out"] == record["held_out"]
    assert not [n for n in given_12.report.notes if "GPTQ" in n]
