"""`compile --time-passes`: each pass's wall time, from edgeq.pipeline's TimingInstrument, with
the passes of a pipeline indented under the pipeline's own row."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeq.pipeline import TimingInstrument


@dataclass
class PassTime:
    name: str
    seconds: float
    depth: int                      # pipelines around the pass (0: the compile's own pipeline)
    pipeline: bool
    passes: list["PassTime"] = field(default_factory=list)


class PassTimes(TimingInstrument):
    """A TimingInstrument that also notes where each timed pass sat: its nesting depth and
    whether it is a pipeline (the instrument's list alone does not say)."""

    def __init__(self) -> None:
        super().__init__()
        self._where: list[tuple[int, bool]] = []

    def after_pass(self, pass_, result, ctx):
        super().after_pass(pass_, result, ctx)
        self._where.append((ctx.depth, pass_.is_pipeline))

    def tree(self) -> list[PassTime]:
        """The outermost passes in run order, each pipeline holding its passes. The timings come
        in completion order, so a pipeline's passes are already collected when it arrives."""
        finished: dict[int, list[PassTime]] = {}
        for (name, seconds), (depth, pipeline) in zip(self.seconds, self._where):
            row = PassTime(name, seconds, depth, pipeline, finished.pop(depth + 1, []) if pipeline else [])
            finished.setdefault(depth, []).append(row)
        return finished.get(0, [])

    def rows(self) -> list[PassTime]:
        """Every timed pass, each pipeline before its passes."""
        out: list[PassTime] = []

        def visit(rows: list[PassTime]) -> None:
            for row in rows:
                out.append(row)
                visit(row.passes)

        visit(self.tree())
        return out

    def to_json(self) -> list[dict]:
        """The `pass_seconds` list of `compile --json --time-passes`."""
        return [{"name": r.name, "seconds": r.seconds, "depth": r.depth, "pipeline": r.pipeline} for r in self.rows()]

    def text_lines(self) -> list[str]:
        rows = self.rows()
        width = max((2 * r.depth + len(r.name) for r in rows), default=0)
        return ["pass times (wall clock):"] + [
            f"  {'  ' * r.depth + r.name:<{width}}  {r.seconds:8.3f} s" for r in rows]
