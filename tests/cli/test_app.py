"""edgeq.cli.app: the verbs joined to the group, exit codes, --debug, the process boundary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

import edgeq
from edgeq.cli import app, cli, main

RUN_MAIN = "import sys; from edgeq.cli import main; sys.exit(main())"


def test_version(run_cli):
    code, out, err = run_cli("--version")
    assert code == 0 and out.strip() == f"edgeq, version {edgeq.__version__}" and err == ""


CORE_VERBS = {"bench", "inspect", "passes", "targets", "compile", "eval", "estimate", "package"}


def test_every_verb_is_joined_and_listed(run_cli):
    assert set(cli.commands) >= CORE_VERBS
    backends = {path.split(":")[0].split(".")[2] for path in app.BACKEND_COMMAND_GROUPS}
    verbs = cli.list_commands(click.Context(cli))
    assert backends and verbs == sorted(CORE_VERBS | {"models"} | backends)
    code, out, _ = run_cli("--help")
    listed = out.split("Commands:")[1].split()
    assert code == 0 and all(verb in listed for verb in verbs)


def test_backend_groups_are_mounted_under_their_package_name():
    for path in app.BACKEND_COMMAND_GROUPS:
        module, _, attribute = path.partition(":")
        family = module.split(".")[2]
        assert module == f"edgeq.backends.{family}.cli"
        assert isinstance(cli.get_command(click.Context(cli), family), click.Group)


def test_models_and_backend_groups_are_imported_only_when_used(tmp_path):
    probe = ("import sys, edgeq.cli; "
             "print(sorted(m for m in sys.modules if m.startswith(('edgeq.models', 'edgeq.backends'))))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_debug_state_does_not_leak_into_the_next_call(capsys, tmp_path):
    with pytest.raises(edgeq.EdgeqError):
        main(["--debug", "inspect", str(tmp_path / "nope.onnx")])
    capsys.readouterr()
    assert main(["no-such-verb"]) == 2
    capsys.readouterr()
    code = main(["inspect", str(tmp_path / "nope.onnx")])
    assert code == 2 and capsys.readouterr().err.startswith("error: model file not found")


def test_usage_errors_exit_2(run_cli, synthetic_bert, tmp_path):
    code, _, err = run_cli("compile", synthetic_bert, "-t", "x86-vnni", "-o", tmp_path / "o.onnx", "--weights", "int3")
    assert code == 2 and "int3" in err
    code, _, err = run_cli("no-such-verb")
    assert code == 2 and "no-such-verb" in err
    assert list(tmp_path.iterdir()) == []


def test_a_bug_exits_1_and_points_at_debug(run_cli, monkeypatch, synthetic_bert):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("edgeq.frontend.inspect.summarize", broken)
    code, _, err = run_cli("inspect", synthetic_bert)
    assert code == 1
    assert err.strip() == "internal error: ZeroDivisionError: a bug (run with --debug for the traceback)"


# ---- process boundary ------------------------------------------------------------------------


def _subprocess(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_MAIN, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_debug_shows_the_traceback_and_plain_errors_do_not(tmp_path):
    plain = _subprocess("inspect", tmp_path / "nope.onnx", cwd=tmp_path)
    assert plain.returncode == 2
    missing = tmp_path / "nope.onnx"
    assert plain.stderr.strip().splitlines() == [f"error: model file not found: {missing} (check the path)"]
    debug = _subprocess("--debug", "inspect", tmp_path / "nope.onnx", cwd=tmp_path)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert "edgeq.errors.ModelLoadError" in debug.stderr


def test_python_m_edgeq_cli_knows_compile(tmp_path):
    result = subprocess.run([sys.executable, "-m", "edgeq.cli", "compile", "--help"], capture_output=True,
                            text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and "--target" in result.stdout and "--time-passes" in result.stdout


def test_python_m_edgeq_cli_reaches_a_backend_group(tmp_path):
    result = subprocess.run([sys.executable, "-m", "edgeq.cli", "fpga", "--help"], capture_output=True,
                            text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and "devices" in result.stdout
