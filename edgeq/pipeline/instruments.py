"""Instruments: what watches a pipeline without being part of any pass (after TVM's
`ir/instrument.py`): wall time per pass, IR checks after each pass, dumps, and returning the
pages of memory-mapped weights to the kernel."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

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
