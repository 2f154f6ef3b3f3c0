"""edgeq.cli.pass_times: the --time-passes table nests each pipeline's passes under it."""

from __future__ import annotations

import time

from edgeq.cli.pass_times import PassTimes
from edgeq.pipeline import Pass, PassContext, PassManager, PassResult


class _Sleep(Pass):
    description = "waits"

    def __init__(self, name: str, seconds: float) -> None:
        self.name = name  # type: ignore[misc]
        self.seconds = seconds

    def run(self, graph, ctx):
        time.sleep(self.seconds)
        return PassResult(graph, False)


def _timed(pipeline: PassManager) -> PassTimes:
    timing = PassTimes()
    pipeline(None, PassContext(instruments=[timing]))
    return timing


def test_nested_pipelines_hold_their_passes_in_run_order():
    inner = PassManager([_Sleep("b", 0.0), _Sleep("c", 0.0)], name="inner")
    timing = _timed(PassManager([_Sleep("a", 0.0), inner, _Sleep("d", 0.0)], name="outer"))
    assert [(r.name, r.depth, r.pipeline) for r in timing.rows()] == [
        ("outer", 0, True), ("a", 1, False), ("inner", 1, True), ("b", 2, False), ("c", 2, False), ("d", 1, False)]
    (outer,) = timing.tree()
    assert [p.name for p in outer.passes] == ["a", "inner", "d"]
    assert [p.name for p in outer.passes[1].passes] == ["b", "c"]


def test_times_are_the_timing_instruments_and_a_pipeline_covers_its_passes():
    timing = _timed(PassManager([_Sleep("slow", 0.02), _Sleep("fast", 0.0)], name="outer"))
    seconds = dict(timing.seconds)
    rows = {r.name: r.seconds for r in timing.rows()}
    assert rows == seconds
    assert rows["slow"] >= 0.02 and rows["outer"] >= rows["slow"] + rows["fast"]


def test_text_indents_passes_under_their_pipeline_and_json_keeps_the_nesting():
    timing = _timed(PassManager([_Sleep("a-long-pass-name", 0.0), _Sleep("b", 0.0)], name="outer"))
    header, *rows = timing.text_lines()
    assert header == "pass times (wall clock):"
    assert [row.split()[0] for row in rows] == ["outer", "a-long-pass-name", "b"]
    assert [len(row) - len(row.lstrip()) for row in rows] == [2, 4, 4]
    assert len({len(row) for row in rows}) == 1  # the seconds column lines up
    assert all(row.endswith(" s") for row in rows)
    assert [(t["name"], t["depth"], t["pipeline"]) for t in timing.to_json()] == [
        ("outer", 0, True), ("a-long-pass-name", 1, False), ("b", 1, False)]
