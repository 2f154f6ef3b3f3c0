"""Ctrl-C and SIGTERM (what `timeout`, CI runners, job schedulers and container stops send):
both unwind the command like an exception, so every temporary folder (`with
TemporaryDirectory`, spooled calibration data) is removed and no partial output stays; the
process then exits with the conventional code, 130 after SIGINT and 143 after SIGTERM
(128 + the signal number), and one line saying whether anything was written.

- `handling_signals()` (around a command, in the main thread): SIGINT raises KeyboardInterrupt
  and SIGTERM raises `Terminated`, the first time; a second signal during the cleanup is
  ignored, so the cleanup finishes (SIGKILL still stops the process).
- `committing()` (around the final writes): both signals wait until the block ends, so the
  outputs are written completely or not at all; each written path is noted (`note_written`).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_WRITTEN: list[Path] = []


class Terminated(BaseException):
    """The process received SIGTERM. A BaseException, like KeyboardInterrupt, so that code
    catching `Exception` does not swallow it while cleanups (`finally`, `with`) still run."""

    exit_code = 128 + signal.SIGTERM


def exit_code(interruption: BaseException) -> int:
    return Terminated.exit_code if isinstance(interruption, Terminated) else 128 + signal.SIGINT


def message(interruption: BaseException) -> str:
    """The one line printed after an interruption."""
    what = "terminated (SIGTERM)" if isinstance(interruption, Terminated) else "interrupted (Ctrl-C)"
    if not _WRITTEN:
        return f"{what}: nothing was written (temporary files removed)"
    return f"{what} after writing {', '.join(str(p) for p in _WRITTEN)}"


_STATE = {"fired": False, "deferring": False, "pending": None}


def _raise_for(signum: int) -> None:
    raise (Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())


def _on_signal(signum, frame) -> None:
    if _STATE["fired"]:
        return  # already unwinding: let the cleanup finish
    if _STATE["deferring"]:
        _STATE["pending"] = _STATE["pending"] or signum
        return
    _STATE["fired"] = True
    _raise_for(signum)


@contextmanager
def handling_signals() -> Iterator[None]:
    """SIGINT -> KeyboardInterrupt, SIGTERM -> Terminated (first signal only) inside the block;
    the previous handlers come back after it. Outside the main thread it does nothing."""
    _WRITTEN.clear()
    _STATE.update(fired=False, deferring=False, pending=None)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    for sig in _SIGNALS:
        signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def committing() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block (the writes of the outputs) is done; a signal that
    arrived meanwhile is raised after it (Python runs signal handlers in the main thread, so a
    flag the handler reads is enough, whichever thread the kernel delivered the signal to)."""
    _STATE["deferring"] = True
    try:
        yield
    finally:
        _STATE["deferring"] = False
        pending, _STATE["pending"] = _STATE["pending"], None
        if pending is not None and not _STATE["fired"]:
            _STATE["fired"] = True
            _raise_for(pending)


def note_written(path: Path) -> None:
    _WRITTEN.append(Path(path))


def written() -> list[Path]:
    return list(_WRITTEN)
