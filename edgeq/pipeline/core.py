"""The pass protocol (after onnx-ir's pass infrastructure): passes transform a Graph and report
what they changed; a PassManager is itself a pass; the context carries everything else a pass
may read, explicitly. What observes a pipeline (timing, checks, dumps, page release) is an
instrument (edgeq.pipeline.instruments), never code inside a pass."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Protocol, Sequence, TypeVar

from edgeq.errors import EdgeqError, PassError, PostconditionError, PreconditionError
from edgeq.ir import Graph
from edgeq.pipeline.artifacts import ArtifactKey

if TYPE_CHECKING:
    from edgeq.targets.base import Target

T = TypeVar("T")


@dataclass(frozen=True)
class PassResult:
    graph: Graph
    modified: bool
    stats: Mapping[str, int | float] = field(default_factory=dict)


@dataclass(frozen=True)
class PassRecord:
    """What one pass did, in completion order: pipelines are recorded too (after their passes),
    at the nesting depth they ran at."""

    name: str
    modified: bool
    stats: Mapping[str, int | float]
    depth: int = 0
    pipeline: bool = False


class Task(Protocol):
    """An instrument's view of one long step (calibration runs, GPTQ layers, verification)."""

    def advance(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


class Instrument:
    """Observes passes without touching them (TVM's PassInstrument shape)."""

    def before_pass(self, pass_: "Pass", graph: Graph, ctx: "PassContext") -> None:
        pass

    def after_pass(self, pass_: "Pass", result: PassResult, ctx: "PassContext") -> None:
        pass

    def task(self, description: str, total: int | None, unit: str) -> Task | None:
        """A long step inside a pass (or the compile) begins, of `total` items (None: unknown):
        return a Task to follow it (a progress bar), or None to ignore it."""
        return None


@dataclass
class PassContext:
    """Everything a pass may read besides the graph; passed explicitly, never global."""

    target: "Target | None" = None
    seed: int = 0
    instruments: list[Instrument] = field(default_factory=list)
    records: list[PassRecord] = field(default_factory=list)
    # Results later passes consume (calibration statistics, the quantization plan, ...), under
    # the typed keys of edgeq.pipeline.artifacts.
    artifacts: dict[ArtifactKey, Any] = field(default_factory=dict)
    depth: int = 0  # how many pipelines enclose the pass now running

    @contextmanager
    def task(self, description: str, total: int | None = None, unit: str = "step") -> Iterator[Callable[..., None]]:
        """Announce a long step to the instruments: `with ctx.task("calibration runs", 16, "run") as
        advance:` then `advance()` per item done. Costs nothing when no instrument follows tasks;
        anything with this method (a PassContext, a ProgressInstrument) can be handed to the
        library functions that take a `progress` argument."""
        tasks = [t for t in (i.task(description, total, unit) for i in self.instruments) if t is not None]

        def advance(n: int = 1) -> None:
            for t in tasks:
                t.advance(n)

        try:
            yield advance
        finally:
            for t in tasks:
                t.close()

    def artifact(self, key: ArtifactKey[T], needed_by: str) -> T:
        """The artifact under `key`; a PreconditionError naming its producer when it is missing."""
        if key not in self.artifacts:
            raise PreconditionError(f"pass '{needed_by}' needs the {key.name}, which '{key.producer}' produces "
                                    "and which has not run", fix=f"run '{key.producer}' earlier in the pipeline")
        return self.artifacts[key]


class Pass(ABC):
    """A graph transformation. Options are typed constructor arguments.

    `requires` raises PreconditionError (the graph or context does not fit the pass: the user's
    input or pipeline); `ensures` raises PostconditionError (the pass broke its own promise: a
    bug). Any other exception from `ensures` is reported as a PostconditionError too."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    is_pipeline: ClassVar[bool] = False

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        """Raise a PreconditionError (or another EdgeqError) if the pass cannot run here."""

    @abstractmethod
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        ...

    def ensures(self, graph: Graph, ctx: PassContext) -> None:
        """Raise a PostconditionError if the pass's promises do not hold."""

    def __call__(self, graph: Graph, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx if ctx is not None else PassContext()
        self.requires(graph, ctx)
        for instrument in ctx.instruments:
            instrument.before_pass(self, graph, ctx)
        ctx.depth += 1
        try:
            result = self.run(graph, ctx)
        finally:
            ctx.depth -= 1
        self._check_ensures(result.graph, ctx)
        ctx.records.append(PassRecord(self.name, result.modified, dict(result.stats), ctx.depth, self.is_pipeline))
        for instrument in ctx.instruments:
            instrument.after_pass(self, result, ctx)
        return result

    def _check_ensures(self, graph: Graph, ctx: PassContext) -> None:
        try:
            self.ensures(graph, ctx)
        except PostconditionError:
            raise
        except Exception as err:  # a broken promise is the pass's bug, whatever it raised
            raise PostconditionError(f"{self.name} broke its postcondition: {err}") from err

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PassManager(Pass):
    """Runs passes in order; itself a pass, so pipelines nest. A failure names the failing pass
    and every pass that ran before it."""

    name = "pipeline"
    is_pipeline = True

    def __init__(self, passes: Sequence[Pass], *, name: str = "pipeline", until_fixed_point: bool = False,
                 max_iterations: int = 8):
        self.passes = list(passes)
        self.name = name  # type: ignore[misc]  (instances name their pipelines)
        self.until_fixed_point = until_fixed_point
        self.max_iterations = max_iterations

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        ran: list[str] = []
        modified_any = False
        for _ in range(self.max_iterations if self.until_fixed_point else 1):
            modified = False
            for pass_ in self.passes:
                try:
                    result = pass_(graph, ctx)
                except PassError as err:  # from a nested pipeline: extend its history
                    raise PassError(err.pass_name, ran + err.ran_before, err.cause) from err.cause
                except Exception as err:
                    raise PassError(pass_.name, ran, err) from err
                ran.append(pass_.name)
                graph = result.graph
                modified |= result.modified
            modified_any |= modified
            if not modified:
                break
        return PassResult(graph, modified_any, {"passes": len(ran)})


def leaf_records(records: Sequence[PassRecord]) -> list[PassRecord]:
    """The records of passes that are not pipelines, in run order."""
    return [r for r in records if not r.pipeline]


__all__ = ["EdgeqError", "Instrument", "Pass", "PassContext", "PassManager", "PassRecord", "PassResult", "Task",
           "leaf_records"]
