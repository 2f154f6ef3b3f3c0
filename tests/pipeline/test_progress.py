"""Progress: passes announce long steps through `PassContext.task`, library code through
`edgeq.progress.follow`, and `ProgressInstrument` shows each pass as it runs and a bar per step
on a terminal, plain lines with --verbose elsewhere, and nothing otherwise."""

from __future__ import annotations

import io

import pytest

from edgeq.ir import Graph
from edgeq.pipeline import Instrument, Pass, PassContext, PassManager, PassResult, ProgressInstrument
from edgeq.progress import follow


class _Stepper(Pass):
    """A pass that announces a step of `n` items and advances through it."""

    def __init__(self, name: str, n: int = 3) -> None:
        self.name = name  # type: ignore[misc]
        self.n = n

    def run(self, graph, ctx):
        with ctx.task("probes", self.n, "probe") as advance:
            for _ in range(self.n):
                advance()
        return PassResult(graph, False, {"probes": self.n})


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _pipeline() -> PassManager:
    return PassManager([_Stepper("first"), PassManager([_Stepper("inner", 2)], name="nested"), _Stepper("last")])


def test_a_task_without_instruments_costs_nothing_and_follow_of_none_is_a_no_op():
    ctx = PassContext()
    with ctx.task("anything", 3) as advance:
        advance()
        advance(2)
    with follow(None, "x", 2) as advance:
        advance()
    with follow(object(), "x", 2) as advance:  # no task method: ignored too
        advance()


def test_tasks_reach_every_instrument_that_follows_them_and_are_closed_on_errors():
    events = []

    class Recorder(Instrument):
        def task(self, description, total, unit):
            events.append(("open", description, total, unit))

            class T:
                def advance(self, n=1):
                    events.append(("advance", n))

                def close(self):
                    events.append(("close",))
            return T()

    ctx = PassContext(instruments=[Recorder(), Instrument()])
    with pytest.raises(RuntimeError):
        with follow(ctx, "runs", 4, "run") as advance:
            advance()
            raise RuntimeError("boom")
    assert events == [("open", "runs", 4, "run"), ("advance", 1), ("close",)]


def test_not_on_a_terminal_nothing_is_written_unless_verbose():
    quiet_stream = io.StringIO()
    quiet = ProgressInstrument(quiet_stream)
    _pipeline()(Graph(), PassContext(instruments=[quiet]))
    quiet.close()
    assert not quiet.live and quiet_stream.getvalue() == ""
    assert quiet.total == 3 and quiet.done == 3  # it still counted the passes

    stream = io.StringIO()
    verbose = ProgressInstrument(stream, verbose=True)
    _pipeline()(Graph(), PassContext(instruments=[verbose]))
    lines = stream.getvalue().splitlines()
    passes = [line for line in lines if line.lstrip().startswith("[")]
    assert [line.split()[1] for line in passes] == ["first", "inner", "last"]
    assert passes[0].strip().startswith("[1/3] first") and passes[0].endswith("probes=3")
    steps = [line for line in lines if "probes" in line and not line.lstrip().startswith("[")]
    assert len(steps) == 3 and "3 probes" in steps[0]
    assert lines.index(steps[0]) < lines.index(passes[0])  # a pass's steps come before its line


def test_on_a_terminal_each_pass_is_shown_while_it_runs_and_bars_are_cleared():
    stream = _Terminal()
    seen_during = []

    class Peek(Pass):
        name = "peek"

        def run(self, graph, ctx):
            seen_during.append(stream.getvalue())
            return PassResult(graph, False, {})

    progress = ProgressInstrument(stream, tick_seconds=0.01)
    assert progress.live
    PassManager([_Stepper("first"), Peek()])(Graph(), PassContext(instruments=[progress]))
    progress.close()
    assert "[2/2] peek" in seen_during[0]  # the running pass's line is up before it ends
    text = stream.getvalue()
    assert "probes" in text and "0/3" in text  # the step got its bar, with its total
    assert "[1/2] first" in text and "[2/2] peek" in text
    assert progress._bars == [] and progress._status is None


def test_compile_stages_outside_passes_are_lines_too(tmp_path):
    stream = io.StringIO()
    progress = ProgressInstrument(stream, verbose=True)
    with progress.stage("verification runs", 4, "run") as advance:
        for _ in range(4):
            advance()
    assert stream.getvalue().split() [:4] == ["verification", "runs", "4", "runs,"]
