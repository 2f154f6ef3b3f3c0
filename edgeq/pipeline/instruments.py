"""Instruments: what watches a pipeline without being part of any pass (after TVM's
`ir/instrument.py`): wall time per pass, IR checks after each pass, dumps, returning the
pages of memory-mapped weights to the kernel, and the progress a user sees."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence, TextIO

from edgeq.pipeline.core import Instrument


class TimingInstrument(Instrument):
    """Wall time of every pass, pipelines included, in completion order (the order of
    `PassContext.records`)."""

    def __init__(self) -> None:
        self.seconds: list[tuple[str, float]] = []
        self._start: list[float] = []

    def before_pass(self, pass_, graph, ctx):
        self._start.append(time.perf_counter())

    def after_pass(self, pass_, result, ctx):
        self.seconds.append((pass_.name, time.perf_counter() - self._start.pop()))


class VerifyInstrument(Instrument):
    """Checks the IR invariants after every pass; optionally that onnx and ORT accept it."""

    def __init__(self, with_onnxruntime: bool = False) -> None:
        self.with_onnxruntime = with_onnxruntime

    def after_pass(self, pass_, result, ctx):
        from edgeq.ir.verify import check_with_onnx, verify

        verify(result.graph)
        if self.with_onnxruntime:
            check_with_onnx(result.graph)


class DumpInstrument(Instrument):
    """Saves the graph after each named pass (every pass that is not a pipeline when `after`
    is empty)."""

    def __init__(self, directory: str | Path, after: Sequence[str] = ()) -> None:
        self.directory = Path(directory)
        self.after = set(after)
        self.count = 0

    def after_pass(self, pass_, result, ctx):
        if pass_.is_pipeline or (self.after and pass_.name not in self.after):
            return
        from edgeq.ir import save

        self.count += 1
        save(result.graph, self.directory / f"{self.count:02d}_{pass_.name}.onnx")


class ReleasePagesInstrument(Instrument):
    """After each pass, drops the resident pages of memory-mapped weight files: the weights a
    pass read need not stay in memory for the next one (they are read back from the file)."""

    def after_pass(self, pass_, result, ctx):
        if not pass_.is_pipeline:
            from edgeq.ir.files import release_file_pages

            release_file_pages()


class ProgressInstrument(Instrument):
    """A compile as it runs: each pass when it starts and its wall time when it ends, and a bar
    for every long step a pass announces (`PassContext.task`: calibration runs, GPTQ layers,
    rotation probes) or the compile runs itself (verification, through `task`).

    live (default: `stream` is a terminal): the running pass's line and the bars redraw in place
    (tqdm), its elapsed time ticking; finished passes stay as one line each. Not live: nothing
    is written unless `verbose`, which prints one plain line per finished pass and step.
    `verbose` adds each pass's stats to its line. Call `close()` when the compile ends or fails
    (bars left open by an exception are cleared)."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None, verbose: bool = False,
                 tick_seconds: float = 0.5) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if live is None:
            isatty = getattr(self.stream, "isatty", None)
            live = bool(isatty and isatty())
        self.live = live
        self.verbose = verbose
        self.total = 0            # leaf passes of the outermost pipeline (known when it starts)
        self.done = 0
        self.lines: list[str] = []  # every line written (for tests and the report's log)
        self._running: list[tuple[str, float]] = []
        self._status: Any = None    # tqdm line of the running pass (live)
        self._bars: list[Any] = []
        self._tick_seconds = tick_seconds
        self._stop_ticking: threading.Event | None = None

    # ---- passes ------------------------------------------------------------------------------

    def before_pass(self, pass_, graph, ctx):
        if pass_.is_pipeline:
            if not self.total:
                self.total = _leaf_count(pass_)
            return
        self._running.append((pass_.name, time.perf_counter()))
        if self.live:
            self._close_status()
            self._status = self._bar(total=None, desc=self._label(self.done + 1, pass_.name),
                                     bar_format="{desc}  {elapsed}")
            self._start_ticking()

    def after_pass(self, pass_, result, ctx):
        if pass_.is_pipeline or not self._running:
            return
        name, start = self._running.pop()
        self.done += 1
        self._close_status()
        line = f"{self._label(self.done, name)} {time.perf_counter() - start:7.1f} s"
        if self.verbose and result.stats:
            line += "  " + ", ".join(f"{k}={_short(v)}" for k, v in result.stats.items())
        self.write(line)

    # ---- steps -------------------------------------------------------------------------------

    def task(self, description: str, total: int | None, unit: str):
        inside = bool(self._running)
        if not self.live and not self.verbose:
            return None
        return _Step(self, description, total, unit, inside)

    @contextmanager
    def stage(self, description: str, total: int | None = None, unit: str = "step"):
        """A step of the compile outside any pass (the same as `PassContext.task`)."""
        task = self.task(description, total, unit)
        try:
            yield (task.advance if task is not None else (lambda n=1: None))
        finally:
            if task is not None:
                task.close()

    def write(self, line: str) -> None:
        """A line above the bars (live) or on its own (not live)."""
        self.lines.append(line)
        if self.live:
            from tqdm import tqdm

            tqdm.write(line, file=self.stream)
        elif self.verbose:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        for bar in self._bars:
            bar.close()
        self._bars.clear()
        self._close_status()

    # ---- helpers -------------------------------------------------------------------------------

    def _label(self, index: int, name: str) -> str:
        width = len(str(max(self.total, index)))
        return f"  [{index:>{width}}/{max(self.total, index)}] {name:<28}"

    def _bar(self, **kwargs):
        from tqdm import tqdm

        import shutil

        width = min(shutil.get_terminal_size((100, 24)).columns, 110)
        return tqdm(file=self.stream, leave=False, ncols=width, mininterval=0.2, **kwargs)

    def _close_status(self) -> None:
        if self._stop_ticking is not None:
            self._stop_ticking.set()
            self._stop_ticking = None
        if self._status is not None:
            self._status.close()
            self._status = None

    def _start_ticking(self) -> None:
        self._stop_ticking = self.tick(self._status)

    def tick(self, bar) -> threading.Event:
        """Redraw `bar` (its elapsed time) every tick until the returned event is set: a running
        pass's line or a step without a count, which nothing else updates."""
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(self._tick_seconds):
                try:
                    bar.refresh()
                except Exception:  # noqa: BLE001 - a closed bar or stream: stop quietly
                    return

        threading.Thread(target=tick, name="edgeq-progress", daemon=True).start()
        return stop


class _Step:
    """One long step: a tqdm bar (live) or, verbose and not live, a line when it ends."""

    def __init__(self, owner: ProgressInstrument, description: str, total: int | None, unit: str,
                 inside_pass: bool) -> None:
        self.owner = owner
        self.description = description
        self.unit = unit
        self.count = 0
        self.inside_pass = inside_pass
        self.start = time.perf_counter()
        self.closed = False
        self.bar = None
        self.ticking: threading.Event | None = None
        if owner.live:
            indent = "        " if inside_pass else "  "
            position = len(owner._bars) + (1 if owner._status is not None else 0)
            if total is None:  # nothing to count: the elapsed time, ticking
                self.bar = owner._bar(total=None, desc=f"{indent}{description:<28}", bar_format="{desc}  {elapsed}",
                                      position=position)
                self.ticking = owner.tick(self.bar)
            else:
                self.bar = owner._bar(total=total, desc=indent + description, unit=f" {unit}", position=position)
            owner._bars.append(self.bar)

    def advance(self, n: int = 1) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        seconds = time.perf_counter() - self.start
        if self.ticking is not None:
            self.ticking.set()
        if self.bar is not None:
            self.bar.close()
            if self.bar in self.owner._bars:
                self.owner._bars.remove(self.bar)
            self.bar = None
        if self.inside_pass and not self.owner.verbose:
            return  # the pass's own line says when it ended
        plural = "" if self.count == 1 or self.unit.endswith("s") else "s"
        done = f"{self.count} {self.unit}{plural}, " if self.count else ""
        width = 20 if self.inside_pass else 28
        self.owner.write(f"{'        ' if self.inside_pass else '  '}{self.description:<{width}} {done}{seconds:.1f} s")


def _leaf_count(pipeline) -> int:
    return sum(_leaf_count(p) if p.is_pipeline else 1 for p in getattr(pipeline, "passes", ()))


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
