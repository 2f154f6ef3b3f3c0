"""Markers of the IR tests (fixtures shared with other directories live in tests/conftest.py)."""

from __future__ import annotations


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "large_file: writes a model over 2 GB (sparse source, ~2.3 GB real output) to a temporary "
                   "folder and deletes it; runs in CI (about 20 s), deselect locally with -m 'not large_file'")
