"""`edgeq bench`: float and compiled models on their runtimes, one interleaved run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeq.options import CompileOptions


@pytest.fixture(scope="module")
def compiled_bert(tmp_path_factory, synthetic_bert, bert_samples) -> Path:
    from edgeq.compiler import compile as compile_model

    path = tmp_path_factory.mktemp("bench") / "bert-x86.onnx"
    compile_model(synthetic_bert, "x86-vnni", CompileOptions(threads=1, verify=False), calibration=bert_samples,
                  provider="cpu").save(path)
    return path


def test_bench_of_a_float_and_a_compiled_model_with_no_flags_but_the_paths(run_cli, synthetic_bert, compiled_bert):
    code, out, err = run_cli("bench", synthetic_bert, compiled_bert, "--repeats", "2", "--warmup", "1")
    assert code == 0, err
    lines = out.splitlines()
    assert "default for text models: batch 1 x 128 tokens" in lines[0] or "recorded" in lines[0]
    assert any("CPUExecutionProvider fp32" in line and "float" in line for line in lines)
    assert any("(x86-vnni)" in line for line in lines)
    assert any(line.startswith("baseline (best float path here):") for line in lines)


def test_bench_json_has_a_median_for_every_row(run_cli, synthetic_bert, compiled_bert):
    code, out, err = run_cli("bench", synthetic_bert, compiled_bert, "--repeats", "2", "--warmup", "0",
                             "--shape", "input_ids=2x16", "--threads", "1", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["shapes"]["input_ids"] == [2, 16] and data["shapes"]["attention_mask"] == [2, 16]
    assert data["rows"] and all(r["median_ms"] > 0 and len(r["runs_ms"]) == 2 for r in data["rows"])
    kinds = {r["kind"] for r in data["rows"]}
    assert kinds == {"float", "compiled"}
    assert all(r["vs_best_float"] is not None for r in data["rows"])


def test_bench_refuses_a_shape_of_no_input(run_cli, synthetic_bert):
    code, _, err = run_cli("bench", synthetic_bert, "--shape", "pixels=1x3")
    assert code == 2 and "--shape names no model input 'pixels'" in err and "\n" not in err.strip()


def test_bench_names_the_missing_provider(run_cli, compiled_bert):
    code, _, err = run_cli("bench", compiled_bert, "--provider", "qnn")
    assert code == 2 and "no provider 'qnn'" in err
