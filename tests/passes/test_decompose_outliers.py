"""decompose-outliers: before quantization the decomposed model is the same function (ORT), the
float columns are the planted outlier channels, a graph without columns over the threshold is
left alone, the quantized error drops against the same compile without it, the rotation is off
by default with it, and the CLI takes `--decompose-outliers [THRESHOLD]` with one-line errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from edgeq.models import synthetic
from edgeq.passes.decompose_outliers import DecomposeOutliers
from edgeq.passes.select_precision import SelectPrecision
from edgeq.passes.smooth_quant import SmoothQuant

import edgeq
from edgeq.cli import app, main
from edgeq.errors import OptionError
from edgeq.ir import Graph
from edgeq.options import SMOOTH_SEARCH_GRID, CompileOptions
from edgeq.pipeline import PassManager, VerifyInstrument
from edgeq.pipeline.artifacts import OUTLIER_COLUMNS
from edgeq.quant.plan import rotates
from edgeq.registry import get_pass, get_target
from tests.passes.helpers import PREPROCESS, assert_valid, ptq_context, relative_l2, run

TOLERANCE = 1e-5  # relative; measured 6e-7..9e-7 (Llama), 1e-8..3e-8 (BERT): only the order of additions changes


def _decompose(graph: Graph, path, feeds, threshold: float | None = 6.0):
    """Preprocess, plan, decompose: the pipeline up to (not including) smoothing and quantization."""
    ctx = ptq_context("x86-vnni", path, feeds)
    ctx.instruments.append(VerifyInstrument())
    passes = [get_pass(n)() for n in PREPROCESS] + [get_pass("linear-to-gemm")(), SelectPrecision(CompileOptions()),
                                                    DecomposeOutliers(threshold)]
    PassManager(passes)(graph, ctx)
    assert_valid(graph)
    return next(r for r in ctx.records if r.name == "decompose-outliers"), ctx.artifacts.get(OUTLIER_COLUMNS)


def _float_columns(graph: Graph) -> dict[str, list[int]]:
    """The Gathered columns of each decomposed activation, by activation name."""
    return {v.name.removesuffix("_outlier_columns"): v.const.numpy().tolist() for v in graph.initializers
            if v.name.endswith("_outlier_columns")}


@pytest.mark.parametrize("which", ["llama", "bert"])
def test_decomposed_model_is_the_float_function(which, synthetic_llama, synthetic_bert, llama_feeds, bert_feeds):
    path, feeds = (synthetic_llama, llama_feeds) if which == "llama" else (synthetic_bert, bert_feeds)
    graph = edgeq.load(path)
    record, _ = _decompose(graph, path, feeds[:4])
    assert record.modified and record.stats["linears"] == record.stats["of_linears"] > 0
    assert len(graph.ops_of_type("Gather")) > 1 and graph.ops_of_type("Mul")  # the float side paths exist
    reference = onnx.load(str(path))
    for feed in feeds[4:]:  # samples the columns were not found on
        for expected, actual in zip(run(reference, feed, optimize=False), run(graph, feed, optimize=False)):
            assert relative_l2(expected, actual) < TOLERANCE


def test_norm_fed_linears_take_exactly_the_planted_channels(synthetic_llama, llama_feeds):
    graph = edgeq.load(synthetic_llama)
    planted = synthetic.outliers(onnx.load(str(synthetic_llama))).activation_channels
    record, result = _decompose(graph, synthetic_llama, llama_feeds[:4])
    columns = _float_columns(graph)
    # Layer 0's input norm sees the embeddings only: its large columns are the planted gains.
    assert columns["/model/layers.0/input_layernorm/Mul_1_output_0"] == planted
    for name in ("q_proj", "k_proj", "v_proj"):
        assert result.columns[f"/model/layers.0/self_attn/{name}/MatMul"] == len(planted)
    # Every norm-fed activation carries the planted channels (later ones may add more).
    for name, cols in columns.items():
        if "layernorm" in name or name.startswith("/model/norm"):
            assert set(planted) <= set(cols)
    assert record.stats["columns"] == sum(len(c) for c in columns.values())
    assert record.stats["max_columns"] == max(len(c) for c in columns.values())
    assert sum(result.columns.values()) == sum(len(c) * len(graph.consumers(graph.value(n + "_inliers")))
                                               for n, c in columns.items())
    assert "input column(s) in float" in result.describe()


def test_int8_weights_lose_the_float_rows(synthetic_llama, llama_feeds):
    graph = edgeq.load(synthetic_llama)
    _decompose(graph, synthetic_llama, llama_feeds[:4])
    q_proj = next(op for op in graph.ops_of_type("MatMul") if op.name == "/model/layers.0/self_attn/q_proj/MatMul")
    columns = _float_columns(graph)["/model/layers.0/input_layernorm/Mul_1_output_0"]
    w = graph.inputs_of(q_proj)[1].const.numpy()
    assert not w[columns].any() and np.abs(w).sum() > 0
    rows = graph.value(graph.inputs_of(q_proj)[1].name + "_outlier_rows").const.numpy()
    assert rows.shape == (len(columns), w.shape[1]) and np.abs(rows).min(axis=1).all() >= 0 and rows.any()


def test_no_column_over_the_threshold_changes_nothing(synthetic_llama, llama_feeds):
    graph = edgeq.load(synthetic_llama)
    before = edgeq.ir.to_model_proto(graph).SerializeToString()
    reference = edgeq.load(synthetic_llama)
    _decompose(reference, synthetic_llama, llama_feeds[:4], threshold=None)  # the same pipeline, pass off
    record, result = _decompose(graph, synthetic_llama, llama_feeds[:4], threshold=1e6)
    assert not record.modified and record.stats["columns"] == 0 and record.stats["linears"] == 0
    assert "nothing split" in result.describe()
    assert edgeq.ir.to_model_proto(graph).SerializeToString() == edgeq.ir.to_model_proto(reference).SerializeToString()
    assert before != b""


def test_a_threshold_below_every_column_leaves_the_layers_whole(synthetic_llama, llama_feeds):
    graph = edgeq.load(synthetic_llama)
    record, result = _decompose(graph, synthetic_llama, llama_feeds[:4], threshold=1e-12)
    assert not record.modified and record.stats["every_column_over"] == 9 and not result.columns
    assert not _float_columns(graph) and not any(v.name.endswith("_inlier_mask") for v in graph.initializers)


def test_not_requested_is_a_no_op_without_artifact(synthetic_llama, llama_feeds):
    graph = edgeq.load(synthetic_llama)
    record, result = _decompose(graph, synthetic_llama, llama_feeds[:4], threshold=None)
    assert not record.modified and result is None


def test_rotation_is_off_by_default_with_the_decomposition():
    target = get_target("x86-vnni")
    assert rotates(CompileOptions(), target) == "if-stream"
    assert rotates(CompileOptions(decompose_outliers=6.0), target) == "no"
    assert rotates(CompileOptions(decompose_outliers=6.0, rotate=True), target) == "yes"  # both, when asked
    assert rotates(CompileOptions(decompose_outliers=6.0), get_target("arm-dotprod")) == "no"


def test_quantized_error_is_lower_with_the_decomposition(synthetic_llama, llama_samples):
    """Held-out W8A8 error (the compile's verification), all without rotation: the decomposition
    (which turns SmoothQuant's default search off) against the plain compile with and without
    SmoothQuant. Measured: 0.046 against 0.100 (search) and 0.278 (no SmoothQuant)."""
    errors = {}
    cases = {"plain": CompileOptions(rotate=False),
             "plain, no smoothing": CompileOptions(rotate=False, smooth_alpha_grid=()),
             "decomposed": CompileOptions(decompose_outliers=6.0)}
    for name, options in cases.items():
        compiled = edgeq.compile(synthetic_llama, "x86-vnni", options, calibration=llama_samples)  # 2 held out
        assert_valid(compiled.graph)
        errors[name] = compiled.report.verification.outputs[0].relative_l2
        if name == "decomposed":
            settings = compiled.report.settings
            assert settings["outlier decomposition"].startswith("threshold 6: 15 of 15 linear(s)")
            assert settings["Hadamard rotation"] == "off (--decompose-outliers instead)"
            assert settings["SmoothQuant"] == "off"
            assert len(compiled.graph.ops_of_type("Gather")) > 9  # the float side paths survived quantization
    assert errors["decomposed"] < 0.6 * errors["plain"], errors
    assert errors["decomposed"] < 0.3 * errors["plain, no smoothing"], errors


def test_smoothing_search_is_off_by_default_with_the_decomposition():
    target = get_target("x86-vnni")
    assert SmoothQuant.from_options(CompileOptions(decompose_outliers=6.0), target).alpha_grid == ()
    assert SmoothQuant.from_options(CompileOptions(rotate=False), target).alpha_grid == SMOOTH_SEARCH_GRID
    asked = CompileOptions(decompose_outliers=6.0, smooth_alpha_grid=SMOOTH_SEARCH_GRID)  # --smooth-search
    assert SmoothQuant.from_options(asked, target).alpha_grid == SMOOTH_SEARCH_GRID


# ---- CLI ----------------------------------------------------------------------------------


@pytest.fixture
def cli(capsys, monkeypatch):
    monkeypatch.setitem(app._DEBUG, "on", False)

    def call(*args) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return call


@pytest.fixture(scope="module")
def llama_calib_dir(tmp_path_factory, llama_samples):
    directory = tmp_path_factory.mktemp("llama_calib")
    for i, feed in enumerate(llama_samples):
        np.savez(directory / f"sample_{i:02d}.npz", **feed)
    return directory


def test_cli_flag_end_to_end_and_deterministic(cli, tmp_path, synthetic_llama, llama_calib_dir):
    outputs = []
    for run_index, extra in enumerate((["--decompose-outliers"], ["--decompose-outliers"], ["--decompose-outliers", "8"])):
        out = tmp_path / f"m{run_index}.onnx"
        code, stdout, err = cli("compile", synthetic_llama, "-t", "x86-vnni", "-o", out, "--calib", llama_calib_dir,
                                *extra, "--json")
        assert code == 0, err
        report = json.loads(stdout)
        threshold = float(extra[1]) if len(extra) > 1 else 6.0
        assert report["options"]["decompose_outliers"] == threshold
        stats = next(p for p in report["passes"] if p["name"] == "decompose-outliers")["stats"]
        assert stats["columns"] > 0 and stats["linears"] == 15
        assert report["settings"]["outlier decomposition"].startswith(f"threshold {threshold:g}:")
        rotation = next(p for p in report["passes"] if p["name"] == "hadamard-rotation")
        assert not rotation["modified"] and rotation["stats"]["rotated"] == 0
        graph = edgeq.load(out)
        assert_valid(graph)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]  # byte-identical for the same inputs
    assert outputs[0] != outputs[2]  # threshold 8 splits fewer columns


@pytest.mark.parametrize("text", ["abc", "0", "nan", "inf"])  # click takes "-1" for an option of its own
def test_cli_bad_threshold_is_one_line(cli, tmp_path, synthetic_llama, llama_calib_dir, text):
    code, _, err = cli("compile", synthetic_llama, "-t", "x86-vnni", "-o", tmp_path / "m.onnx", "--calib",
                       llama_calib_dir, "--decompose-outliers", text)
    assert code == 2 and "Traceback" not in err
    assert "--decompose-outliers threshold must be a positive number" in err
    assert len([line for line in err.splitlines() if line.strip()]) <= 2  # the error and its fix
    assert not (tmp_path / "m.onnx").exists()


def test_threshold_parsing_in_options():
    assert CompileOptions(decompose_outliers="7.5").decompose_outliers == 7.5
    for bad in ("x", 0, -3.0, float("nan"), True):
        with pytest.raises(OptionError, match="--decompose-outliers threshold"):
            CompileOptions(decompose_outliers=bad)


def test_target_without_the_pass_refuses_the_flag(cli, tmp_path, synthetic_llama, llama_calib_dir):
    code, _, err = cli("compile", synthetic_llama, "-t", "fpga", "-o", tmp_path / "m.onnx", "--calib",
                       llama_calib_dir, "--decompose-outliers")
    assert code == 2 and "does not take --decompose-outliers" in err and "Traceback" not in err
