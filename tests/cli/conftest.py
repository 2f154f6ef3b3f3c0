"""Fixtures of the CLI tests: the command line run in process (exit code, stdout, stderr)."""

from __future__ import annotations

from typing import Callable

import pytest

from edgeq.cli import app, main


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.setitem(app._DEBUG, "on", False)  # --debug state must not leak between tests


@pytest.fixture
def run_cli(capsys) -> Callable[..., tuple[int, str, str]]:
    """run_cli(*argv) -> (exit code, stdout, stderr) of `edgeq *argv`, in process."""

    def run(*args) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
