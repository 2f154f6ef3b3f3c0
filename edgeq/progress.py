"""Progress of long steps, for library code that a pass or the compile calls (calibration runs,
layer-input streams, verification): `follow(progress, "calibration runs", 16, "run")` is a
context manager yielding `advance(n=1)`. `progress` is anything with a `task(description,
total, unit)` context manager (a `PassContext`, which tells its instruments, or a
`ProgressInstrument`), or None: then nothing is shown and nothing is paid.

A leaf module (no edgeq imports), so every layer may use it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def _ignore(n: int = 1) -> None:
    return None


@contextmanager
def follow(progress: Any, description: str, total: int | None = None, unit: str = "step") -> Iterator[Callable[..., None]]:
    """`advance(n=1)` for a step of `total` items, shown by `progress` (None: shown nowhere)."""
    if progress is None or not callable(getattr(progress, "task", None)):
        yield _ignore
        return
    with progress.task(description, total, unit) as advance:
        yield advance
