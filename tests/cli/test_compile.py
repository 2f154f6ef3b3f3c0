"""edgeq.cli.compile: `edgeq compile` writes a valid model and its report, refuses bad input with
one line and exit 2 before writing anything, and times its passes on request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edgeq
from edgeq import registry
from edgeq.targets.base import validate
from tests.passes.helpers import assert_valid


# ---- compile -------------------------------------------------------------------------------


def test_compile_writes_model_and_reports(run_cli, tmp_path, synthetic_bert, bert_calib_dir):
    out_model = tmp_path / "out" / "bert-int8.onnx"
    out_model.parent.mkdir()
    code, out, err = run_cli("compile", synthetic_bert, "-t", "x86-vnni", "-o", out_model,
                           "--calib", bert_calib_dir, "--report", tmp_path / "report.json")
    assert code == 0, err
    assert out.splitlines()[0] == f"wrote {out_model}"
    assert "pass times" not in out  # only with --time-passes
    graph = edgeq.load(out_model)
    assert_valid(graph)
    assert validate(graph, registry.get_target("x86-vnni")) == []
    assert graph.ops_of_type("QuantizeLinear") and graph.ops_of_type("DequantizeLinear")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["target"] == "x86-vnni" and report["scheme"].startswith("W8A8")
    assert report["verification"]["samples"] == 2
    assert [p["name"] for p in report["passes"]] == list(registry.get_target("x86-vnni").default_pipeline)
    code, out, err = run_cli("compile", synthetic_bert, "-t", "x86-vnni", "-o", tmp_path / "b.onnx",
                           "--calib", bert_calib_dir, "--report", tmp_path / "report.md")
    assert code == 0, err
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("# edgeq compile report: ") and "## Passes" in markdown
    assert "## Verification against float (ONNX Runtime)" in markdown
    assert (tmp_path / "b.onnx").read_bytes() == out_model.read_bytes()  # deterministic via the CLI too


def test_compile_json_flag_prints_the_report(run_cli, tmp_path, synthetic_bert, bert_calib_dir):
    code, out, err = run_cli("compile", synthetic_bert, "-t", "x86-avx2", "-o", tmp_path / "o.onnx",
                           "--calib", bert_calib_dir, "--weights", "int4", "--group", "32", "--activations", "float",
                           "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["scheme"].startswith("W4") and report["target"] == "x86-avx2"
    assert report["options"]["group"] == 32 and report["options"]["weights"] == "int4"


# ---- bad input: exit 2, one line on stderr, no traceback, nothing written --------------------


def _write_npz_dir(directory: Path, samples: list[dict]) -> Path:
    directory.mkdir()
    for i, sample in enumerate(samples):
        np.savez(directory / f"s{i}.npz", **sample)
    return directory


def _bad_case(case: str, tmp: Path, bert: Path, mlp: Path, calib: Path) -> tuple[list, str]:
    """(argv without -o, words the error line must contain)."""
    target = ["-t", "x86-vnni"]
    if case == "missing file":
        return ["compile", tmp / "nope.onnx", *target, "--calib", calib], "model file not found"
    if case == "not onnx":
        (tmp / "text.onnx").write_text("this is not a model\n")
        return ["compile", tmp / "text.onnx", *target, "--calib", calib], "not an ONNX model"
    if case == "truncated":
        (tmp / "cut.onnx").write_bytes(bert.read_bytes()[:5000])
        return ["compile", tmp / "cut.onnx", *target, "--calib", calib], "truncated"
    if case == "empty file":
        (tmp / "empty.onnx").write_bytes(b"")
        return ["compile", tmp / "empty.onnx", *target, "--calib", calib], "empty"
    if case == "unknown target":
        return ["compile", bert, "-t", "x86-vnni2", "--calib", calib], "unknown target 'x86-vnni2' (known targets:"
    if case == "calib wrong input name":
        feed = dict(np.load(next(calib.iterdir())))
        feed["input_idz"] = feed.pop("input_ids")
        return ["compile", bert, *target, "--calib", _write_npz_dir(tmp / "c", [feed])], "'input_idz'"
    if case == "calib NaN":
        samples = [{"x": np.random.default_rng(i).standard_normal((2, 16)).astype(np.float32)} for i in range(4)]
        samples[1]["x"][0, 3] = np.nan
        return ["compile", mlp, *target, "--calib", _write_npz_dir(tmp / "c", samples)], "NaN"
    if case == "calib empty dir":
        (tmp / "c").mkdir()
        return ["compile", bert, *target, "--calib", tmp / "c"], "has no .npz files"
    if case == "calib missing":
        return ["compile", bert, *target, "--calib", tmp / "nowhere"], "does not exist"
    if case == "calib float for int input":
        feed = {k: v.astype(np.float64) for k, v in np.load(next(calib.iterdir())).items()}
        return ["compile", bert, *target, "--calib", _write_npz_dir(tmp / "c", [feed] * 3)], "input_ids"
    if case == "bad group":
        return ["compile", bert, *target, "--calib", calib, "--weights", "int4", "--group", "33"], "--group"
    if case == "group too small":
        return ["compile", bert, *target, "--calib", calib, "--weights", "int4", "--group", "8"], "--group"
    if case == "no calibration for W8A8":
        return ["compile", bert, *target], "calibration data"
    if case == "bad nodes_to_exclude":
        (tmp / "ex.json").write_text("[1, 2]")
        return ["compile", bert, *target, "--calib", calib, "--nodes-to-exclude", tmp / "ex.json"], "node names"
    if case == "bad tensor overrides":
        (tmp / "ov.json").write_text('{"t": [{"quant_type": "QInt3"}]}')
        return ["compile", bert, *target, "--calib", calib, "--tensor-overrides", tmp / "ov.json"], "QInt3"
    if case == "non-numeric override scale":
        (tmp / "ov.json").write_text('{"t": [{"scale": "abc", "zero_point": 0}]}')
        return ["compile", bert, *target, "--calib", calib, "--tensor-overrides", tmp / "ov.json"], "scale"
    if case == "invalid exclude regex":
        return ["compile", bert, *target, "--calib", calib, "--exclude-regex", "("], "--exclude-regex"
    if case == "input shape not NAME=dims":
        return ["compile", bert, *target, "--calib", calib, "--input-shape", "input_ids:1,16"], "NAME=D0,D1"
    if case == "input shape of no input":
        return ["compile", bert, *target, "--calib", calib, "--input-shape", "ids=1,16"], "names no input"
    if case == "input shape of the wrong rank":
        return ["compile", bert, *target, "--calib", calib, "--input-shape", "input_ids=1,16,1"], "rank 2"
    if case == "input shape against a static dim":
        return ["compile", mlp, *target, "--input-shape", "x=2,8"], "fixes it at 16"
    if case == "input shape the samples do not have":
        return ["compile", bert, *target, "--calib", calib, "--input-shape", "input_ids=1,8"], "input_ids"
    raise AssertionError(case)


BAD_CASES = ["missing file", "not onnx", "truncated", "empty file", "unknown target", "calib wrong input name",
             "calib NaN", "calib empty dir", "calib missing", "calib float for int input", "bad group",
             "group too small", "no calibration for W8A8", "bad nodes_to_exclude", "bad tensor overrides",
             "non-numeric override scale", "invalid exclude regex", "input shape not NAME=dims",
             "input shape of no input", "input shape of the wrong rank", "input shape against a static dim",
             "input shape the samples do not have"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_exits_2_with_one_error_line_and_writes_nothing(run_cli, tmp_path, case, synthetic_bert,
                                                                 mlp_onnx, bert_calib_dir):
    argv, words = _bad_case(case, tmp_path, synthetic_bert, mlp_onnx, bert_calib_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, out, err = run_cli(*argv, "-o", out_dir / "model.onnx", "--report", out_dir / "report.json")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert words in lines[0]
    assert "Traceback" not in err and "internal error" not in err
    assert list(out_dir.iterdir()) == []  # no output, no report, no temporary file


@pytest.mark.parametrize("spelling", ["same", "dotted"])
def test_output_path_equal_to_input_is_refused_and_the_input_survives(run_cli, tmp_path, synthetic_bert,
                                                                      bert_calib_dir, spelling):
    model = tmp_path / "m" / "model.onnx"
    model.parent.mkdir()
    model.write_bytes(synthetic_bert.read_bytes())
    before = model.read_bytes()
    output = model if spelling == "same" else tmp_path / "m" / ".." / "m" / "model.onnx"
    code, _, err = run_cli("compile", model, "-t", "x86-vnni", "-o", output, "--calib", bert_calib_dir)
    assert code == 2 and err.startswith("error: the output would overwrite the input model")
    assert model.read_bytes() == before
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.onnx"]


def test_an_unwritable_output_path_is_a_user_error(run_cli, tmp_path, synthetic_bert, bert_calib_dir):
    (tmp_path / "a_file").write_text("not a directory")
    code, out, err = run_cli("compile", synthetic_bert, "-t", "x86-vnni", "-o", tmp_path / "a_file" / "m.onnx",
                           "--calib", bert_calib_dir)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and str(tmp_path / "a_file") in line and line.endswith("(check the paths given)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_bad_report_path_leaves_no_model_behind(run_cli, tmp_path, synthetic_bert, bert_calib_dir):
    (tmp_path / "a_file").write_text("not a directory")
    code, _, err = run_cli("compile", synthetic_bert, "-t", "x86-vnni", "-o", tmp_path / "m.onnx",
                         "--calib", bert_calib_dir, "--report", tmp_path / "a_file" / "r.json")
    assert code == 2 and err.startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


# ---- --input-shape ---------------------------------------------------------------------------


def test_input_shape_fixes_the_inputs_and_is_recorded_for_estimates(run_cli, tmp_path, synthetic_bert,
                                                                    bert_calib_dir):
    out_model = tmp_path / "static.onnx"
    code, out, err = run_cli("compile", synthetic_bert, "-t", "x86-vnni", "-o", out_model, "--calib", bert_calib_dir,
                             "--input-shape", "input_ids=1,16")
    assert code == 0, err
    graph = edgeq.load(out_model)
    # attention_mask and token_type_ids share input_ids' dims [batch, sequence]: fixed with it
    assert [(v.name, v.shape) for v in graph.inputs] == [(n, (1, 16)) for n in
                                                          ("input_ids", "attention_mask", "token_type_ids")]
    assert not graph.ops_of_type("Shape")  # every shape folded once the inputs are static
    recorded = json.loads(dict(graph.model.metadata_props)["edgeq.input_shapes"])
    assert recorded == {"input_ids": [1, 16], "attention_mask": [1, 16], "token_type_ids": [1, 16]}
    code, out, err = run_cli("estimate", out_model, "-t", "x86-vnni", "--json")
    assert code == 0, err
    assert json.loads(out)["input_shapes"] == recorded


# ---- --time-passes ----------------------------------------------------------------------------


def test_time_passes_prints_each_pass_under_its_pipeline(run_cli, tmp_path, synthetic_bert, bert_calib_dir):
    code, out, err = run_cli("compile", synthetic_bert, "-t", "x86-vnni", "-o", tmp_path / "m.onnx",
                             "--calib", bert_calib_dir, "--time-passes")
    assert code == 0, err
    lines = out.splitlines()
    start = lines.index("pass times (wall clock):")
    assert start > 1 and lines[start - 1].startswith("  ")  # after the summary
    rows = [(len(line) - len(line.lstrip()), line.split()) for line in lines[start + 1:]]
    assert all(words[-1] == "s" for _, words in rows)
    (pipeline_indent, pipeline), *passes = rows
    assert pipeline_indent == 2 and all(indent == 4 for indent, _ in passes)
    assert [words[0] for _, words in passes] == list(registry.get_target("x86-vnni").default_pipeline)
    seconds = [float(words[1]) for _, words in passes]
    assert 0 < sum(seconds) <= float(pipeline[1]) + 0.001 * len(seconds)


def test_time_passes_with_json_adds_only_a_pass_seconds_list(run_cli, tmp_path, synthetic_bert, bert_calib_dir):
    from dataclasses import fields

    from edgeq.report import Report

    code, out, err = run_cli("compile", synthetic_bert, "-t", "x86-vnni", "-o", tmp_path / "m.onnx",
                             "--calib", bert_calib_dir, "--json", "--time-passes")
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == {f.name for f in fields(Report)} | {"size_ratio", "pass_seconds"}
    timed = data["pass_seconds"]
    assert set(timed[0]) == {"name", "seconds", "depth", "pipeline"}
    assert timed[0]["pipeline"] and timed[0]["depth"] == 0
    assert [t["name"] for t in timed[1:]] == [p["name"] for p in data["passes"]]
    assert all(t["depth"] == 1 and not t["pipeline"] and t["seconds"] >= 0 for t in timed[1:])
