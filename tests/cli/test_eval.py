"""edgeq.cli.eval: `edgeq eval` compares a compiled model with its float model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeq.options import CompileOptions


@pytest.fixture(scope="module")
def compiled_bert(tmp_path_factory, synthetic_bert, bert_samples) -> Path:
    from edgeq.compiler import compile as compile_model

    path = tmp_path_factory.mktemp("eval") / "bert-x86.onnx"
    compile_model(synthetic_bert, "x86-vnni", CompileOptions(threads=1, verify=False),
                  calibration=bert_samples).save(path)
    return path


def test_eval_on_calibration_data(run_cli, synthetic_bert, compiled_bert, bert_calib_dir):
    code, out, err = run_cli("eval", synthetic_bert, compiled_bert, "--calib", bert_calib_dir, "--max-samples", "3",
                             "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["samples"] == 3 and result["synthetic_inputs"] is False
    (output,) = result["outputs"]
    assert output["name"] == "last_hidden_state" and 0 < output["relative_l2"] < 0.5


def test_eval_without_data_uses_synthetic_inputs_and_warns_how_to_give_data(run_cli, synthetic_bert,
                                                                            compiled_bert):
    code, out, err = run_cli("eval", synthetic_bert, compiled_bert, "--max-samples", "2")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "2 sample(s) (synthetic inputs)"
    assert lines[1].startswith("  last_hidden_state: rel L2 ")
    (warning,) = err.strip().splitlines()
    assert warning.startswith("warning: no data given, so both models run on random inputs")
    assert "--calib DIR|FILE.npz" in warning and "--calib-text FILE --tokenizer tokenizer.json" in warning


def test_eval_with_data_does_not_warn(run_cli, synthetic_bert, compiled_bert, bert_calib_dir):
    code, _, err = run_cli("eval", synthetic_bert, compiled_bert, "--calib", bert_calib_dir, "--max-samples", "1")
    assert code == 0 and err == ""


def test_eval_takes_one_npz_whose_arrays_have_a_batch_axis(run_cli, tmp_path, synthetic_bert, compiled_bert,
                                                           bert_samples):
    # [4, 16] arrays for inputs [batch, sequence]: 4 samples, as ../shared/reference/minilm_inputs.npz is written
    stacked = {name: np.concatenate([s[name] for s in bert_samples[:4]]) for name in bert_samples[0]}
    assert all(a.shape == (4, 16) for a in stacked.values())
    np.savez(tmp_path / "rows.npz", **stacked)
    code, out, err = run_cli("eval", synthetic_bert, compiled_bert, "--calib", tmp_path / "rows.npz", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["samples"] == 4 and result["synthetic_inputs"] is False


def test_eval_of_a_model_against_itself_has_no_error(run_cli, synthetic_bert):
    code, out, err = run_cli("eval", synthetic_bert, synthetic_bert, "--max-samples", "1", "--json")
    assert code == 0, err
    (output,) = json.loads(out)["outputs"]
    assert output["relative_l2"] == 0.0 and output["max_abs"] == 0.0


def test_eval_refuses_conflicting_calibration_flags(run_cli, synthetic_bert, bert_calib_dir, tmp_path):
    code, _, err = run_cli("eval", synthetic_bert, synthetic_bert, "--calib", bert_calib_dir,
                           "--calib-text", tmp_path / "t.txt")
    assert code == 2 and err.strip() == "error: give either --calib or --calib-text, not both"


def test_eval_of_a_missing_model_is_a_user_error(run_cli, synthetic_bert, tmp_path):
    code, _, err = run_cli("eval", synthetic_bert, tmp_path / "nope.onnx")
    assert code == 2 and err.startswith("error: model file not found")
