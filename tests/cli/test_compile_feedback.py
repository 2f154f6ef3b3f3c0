"""What a user of `edgeq compile` sees besides the model (issue 16): progress and --quiet/--verbose,
calibration data checked before the pipeline, Ctrl-C and SIGTERM that leave nothing behind and
exit 130/143, provenance in the model metadata and a report that names what made the model."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeq import registry
from edgeq.cli import interrupts

REPO_ROOT = Path(__file__).resolve().parents[2]


def _compile(run_cli, model, calib, out: Path, *extra):
    return run_cli("compile", model, "-t", "x86-vnni", "-o", out, "--calib", calib, *extra)


# ---- progress -------------------------------------------------------------------------------


def test_quiet_prints_nothing_and_verbose_prints_each_pass_and_the_decided_options(
        run_cli, tmp_path, synthetic_bert, bert_calib_dir):
    code, out, err = _compile(run_cli, synthetic_bert, bert_calib_dir, tmp_path / "q.onnx", "--quiet")
    assert code == 0, err
    assert out == "" and err == "" and (tmp_path / "q.onnx").exists()

    code, out, err = _compile(run_cli, synthetic_bert, bert_calib_dir, tmp_path / "v.onnx", "--verbose")
    assert code == 0, err
    pipeline = registry.get_target("x86-vnni").default_pipeline
    pass_lines = [re.match(r"\s*\[\s*(\d+)/(\d+)\] (\S+)", line) for line in err.splitlines()]
    pass_lines = [m.groups() for m in pass_lines if m]
    assert [name for _, _, name in pass_lines] == list(pipeline)       # each pass, in run order
    assert pass_lines[0][:2] == ("1", str(len(pipeline)))
    assert err.splitlines()[0].startswith(f"compiling {synthetic_bert.name} for x86-vnni")
    assert any(line.split()[:2] == ["verification", "runs"] for line in err.splitlines())
    assert "options as decided:" in out and "  Hadamard rotation: " in out
    assert "pass times (wall clock):" in out


def test_without_a_terminal_or_verbose_no_progress_is_written(run_cli, tmp_path, synthetic_bert, bert_calib_dir):
    code, out, err = _compile(run_cli, synthetic_bert, bert_calib_dir, tmp_path / "m.onnx")
    assert code == 0, err
    assert err == "" and out.startswith(f"wrote {tmp_path / 'm.onnx'}\n")


def test_quiet_and_verbose_together_is_a_usage_error(run_cli, tmp_path, synthetic_bert, bert_calib_dir):
    code, _, err = _compile(run_cli, synthetic_bert, bert_calib_dir, tmp_path / "m.onnx", "-q", "-v")
    assert code == 2 and "--quiet or --verbose" in err


# ---- calibration data checked before any work -------------------------------------------------


def test_missing_calibration_data_fails_before_the_first_pass(run_cli, tmp_path, synthetic_bert, monkeypatch):
    from edgeq import compiler

    def no_pipeline(*args, **kwargs):
        raise AssertionError("the pipeline must not start")

    monkeypatch.setattr(compiler.PassManager, "run", no_pipeline)
    code, out, err = run_cli("compile", synthetic_bert, "-t", "x86-vnni", "-o", tmp_path / "m.onnx")
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert "calibration data" in line and "--calib DIR|FILE.npz" in line and "--calib-text" in line
    assert "--activations float" in line  # the weight-only way out
    assert not list(tmp_path.iterdir())
    # weight-only needs none
    code, _, err = run_cli("compile", synthetic_bert, "-t", "x86-vnni", "-o", tmp_path / "w.onnx",
                           "--activations", "float", "--weight-rounding", "rtn", "-q")
    assert "calibration data" not in err


def test_gptq_asked_for_without_data_fails_before_the_pipeline(tmp_path, synthetic_bert):
    from edgeq.compiler import compile as compile_model
    from edgeq.errors import CalibrationError
    from edgeq.options import CompileOptions

    with pytest.raises(CalibrationError, match="--weight-rounding gptq"):
        compile_model(synthetic_bert, "x86-vnni", CompileOptions(activations="float", weight_rounding="gptq"))


# ---- the report and the model's provenance -----------------------------------------------------


@pytest.fixture(scope="module")
def compiled_with_report(tmp_path_factory, synthetic_bert, bert_calib_dir):
    from edgeq.cli import main

    out = tmp_path_factory.mktemp("report")
    code = main(["compile", str(synthetic_bert), "-t", "x86-vnni", "-o", str(out / "m.onnx"), "--calib",
                 str(bert_calib_dir), "--report", str(out / "report.md"), "--exclude-op", "Gather", "-q"])
    assert code == 0
    code = main(["compile", str(synthetic_bert), "-t", "x86-vnni", "-o", str(out / "j.onnx"), "--calib",
                 str(bert_calib_dir), "--report", str(out / "report.json"), "--exclude-op", "Gather", "-q"])
    assert code == 0
    return out


def test_the_markdown_report_names_versions_date_output_data_and_held_out_samples(compiled_with_report,
                                                                                  bert_calib_dir):
    import onnxruntime

    text = (compiled_with_report / "report.md").read_text()
    run = text.split("## Run")[1].split("##")[0]
    assert f"output: {compiled_with_report / 'm.onnx'}" in run
    assert f"edgeq 0.1.0, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, provider " \
           "CPUExecutionProvider" in run
    assert "- date: 20" in run and " UTC" in run
    assert "- time: " in run and "pipeline " in run and "verification " in run
    calibration = text.split("## Calibration data")[1].split("##")[0]
    assert f"source: {bert_calib_dir} (.npz directory)" in calibration
    held = sorted(bert_calib_dir.iterdir())[-2:]
    assert f"calibration samples: 6; held out for verification: 2 ({held[0]}, {held[1]})" in calibration
    verification = text.split("## Verification against float")[1]
    assert f"On 2 held-out sample(s): {held[0]}, {held[1]}" in verification
    options = text.split("## Options")[1].split("## Passes")[0]
    assert "| scheme | W8A8 |" in options and "| activations | uint8 asym tensor |" in options
    assert "None" not in options and "null" not in options
    assert "Options given: overrides.exclude_op_types=[\"Gather\"]." in options
    assert "| kept high by request | Gather |" in options


def test_the_report_lists_every_kept_op_and_has_the_model_file_mode(compiled_with_report):
    text = (compiled_with_report / "report.md").read_text()
    report = json.loads((compiled_with_report / "report.json").read_text())
    kept = text.split("## Kept in high precision")[1]
    for reason, names in report["kept_high"].items():
        assert f"- {reason} ({len(names)}): {', '.join(names)}" in kept
    assert " ..." not in kept
    model_mode = stat.S_IMODE((compiled_with_report / "m.onnx").stat().st_mode)
    for name in ("report.md", "report.json"):
        assert stat.S_IMODE((compiled_with_report / name).stat().st_mode) == model_mode
    assert report["output"] == str(compiled_with_report / "j.onnx")
    assert report["options"] == {"overrides.exclude_op_types": ["Gather"]}
    assert report["versions"]["edgeq"] == "0.1.0" and report["total_seconds"] > 0
    assert set(report["stage_seconds"]) >= {"load", "pipeline", "save", "verification"}


def test_the_model_metadata_says_where_it_came_from(compiled_with_report, synthetic_bert, bert_calib_dir):
    model = onnx.load(str(compiled_with_report / "m.onnx"), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    assert (model.producer_name, model.producer_version) == ("edgeq", "0.1.0")
    assert meta["edgeq.version"] == "0.1.0" and meta["edgeq.target"] == "x86-vnni"
    assert meta["edgeq.provider"] == "cpu" and meta["edgeq.scheme"] == "W8A8"
    assert json.loads(meta["edgeq.options"]) == {"overrides.exclude_op_types": ["Gather"]}
    calibration = json.loads(meta["edgeq.calibration"])
    assert calibration["source"] == str(bert_calib_dir) and calibration["calibration_samples"] == 6
    assert len(calibration["held_out"]) == 2
    assert meta["edgeq.float_model_sha256"] == hashlib.sha256(synthetic_bert.read_bytes()).hexdigest()
    # the same compile gives the same bytes: no date or output path in the metadata
    again = compiled_with_report / "again.onnx"
    from edgeq.cli import main

    assert main(["compile", str(synthetic_bert), "-t", "x86-vnni", "-o", str(again), "--calib", str(bert_calib_dir),
                 "--exclude-op", "Gather", "-q"]) == 0
    assert again.read_bytes() == (compiled_with_report / "m.onnx").read_bytes()


def test_an_unknown_report_suffix_is_an_error_before_any_work(run_cli, tmp_path, synthetic_bert, bert_calib_dir,
                                                              monkeypatch):
    from edgeq import compiler

    monkeypatch.setattr(compiler, "compile", lambda *a, **k: pytest.fail("compiled before checking --report"))
    code, out, err = _compile(run_cli, synthetic_bert, bert_calib_dir, tmp_path / "m.onnx",
                              "--report", tmp_path / "report.txt")
    assert code == 2 and out == ""
    assert "'.txt'" in err and "FILE.json or FILE.md" in err
    assert not list(tmp_path.iterdir())


def test_report_write_refuses_an_unknown_suffix(tmp_path):
    from edgeq.errors import OptionError
    from edgeq.report import Report

    with pytest.raises(OptionError, match="FILE.json or FILE.md"):
        Report(model="m", target="t", scheme="W8A8", options={}).write(tmp_path / "r.yaml")
    assert not list(tmp_path.iterdir())


# ---- interruptions ----------------------------------------------------------------------------


def _llama_calib_dir(tmp_path: Path, samples) -> Path:
    directory = tmp_path / "calib"
    directory.mkdir()
    for i, feed in enumerate(samples):
        np.savez(directory / f"s{i}.npz", **feed)
    return directory


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_compile_stopped_mid_way_leaves_no_temporary_folder_and_no_output(tmp_path, synthetic_llama,
                                                                             llama_samples, sig):
    work = tmp_path / "tmp"
    work.mkdir()
    calib = _llama_calib_dir(tmp_path, llama_samples)
    out, report = tmp_path / "out" / "m.onnx", tmp_path / "out" / "report.md"
    env = dict(os.environ, TMPDIR=str(work), PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "edgeq.cli", "compile", str(synthetic_llama), "-t", "x86-vnni",
                             "-o", str(out), "--report", str(report), "--calib", str(calib), "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    inside = []
    # mid-way: once a pass has made its own temporary folder beside the compile's
    while time.monotonic() < deadline and proc.poll() is None:
        inside = [p.name for p in work.iterdir() if p.name.startswith("edgeq-")]
        if any(not name.startswith("edgeq-compile-") for name in inside):
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the compile ended before it could be stopped: {proc.communicate()}"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err
    what = "terminated (SIGTERM)" if sig == signal.SIGTERM else "interrupted (Ctrl-C)"
    assert err.strip().splitlines()[-1] == f"{what}: nothing was written (temporary files removed)"
    assert "Traceback" not in err
    assert any(name.startswith("edgeq-compile-") for name in inside)
    assert [p.name for p in work.iterdir() if p.name.startswith("edgeq-")] == []
    assert not out.exists() and not report.exists()
    assert not out.parent.exists() or not list(out.parent.iterdir())  # no temp file of an atomic write either


def test_ctrl_c_exits_130_and_says_nothing_was_written(run_cli, tmp_path, synthetic_bert, bert_calib_dir,
                                                      monkeypatch):
    from edgeq import compiler

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # click turns it into Abort; main still knows it was Ctrl-C

    monkeypatch.setattr(compiler, "compile", interrupted)
    code, out, err = _compile(run_cli, synthetic_bert, bert_calib_dir, tmp_path / "m.onnx")
    assert code == 130 and out == ""
    assert err.strip() == "interrupted (Ctrl-C): nothing was written (temporary files removed)"


def test_a_signal_while_the_outputs_are_written_waits_until_they_are_complete(tmp_path):
    target = tmp_path / "written.txt"
    with pytest.raises(interrupts.Terminated):
        with interrupts.handling_signals():
            with interrupts.committing():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler runs here, and must hold the signal back
                target.write_text("complete")
                interrupts.note_written(target)
            pytest.fail("the held signal was not raised after the block")
    assert target.read_text() == "complete"
    assert interrupts.message(interrupts.Terminated()) == f"terminated (SIGTERM) after writing {target}"
    assert signal.getsignal(signal.SIGTERM) is not interrupts._on_signal  # handlers restored
