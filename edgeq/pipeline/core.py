"""Pass protocol, pass manager, context and instruments (after onnx-ir's pass infra and TVM's
instruments): passes transform a Graph and report what they changed; instruments observe."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

from edgeq.errors import EdgeqError, PassError
from edgeq.ir import Graph
from edgeq.ir.onnx_io import release_file_pages

if TYPE_CHECKING:
    from edgeq.targets.base import Target


@dataclass(frozen=True)
class PassResult:
    graph: Graph
    modified: bool
    stats: Mapping[str, int | float] = field(default_factory=dict)


@dataclass
class PassRecord:
    """What one pass did, for the report."""

    name: str
    modified: bool
    stats: Mapping[str, int | float]
    seconds: float


class Instrument:
    """Observes passes without touching them (TVM's PassInstrument shape)."""

    def before_pass(self, pass_: "Pass", graph: Graph, ctx: "PassContext") -> None:
        pass

    def after_pass(self, pass_: "Pass", result: PassResult, ctx: "PassContext") -> None:
        pass


@dataclass
class PassContext:
    """Everything a pass may read besides the graph; passed explicitly, never global."""

    target: "Target | None" = None
    seed: int = 0
    instruments: list[Instrument] = field(default_factory=list)
    records: list[PassRecord] = field(default_factory=list)
    # Results that later passes consume (calibration statistics, sensitivity, ...), keyed by
    # the producing pass's name so the dependency is visible in `requires`.
    artifacts: dict[str, Any] = field(default_factory=dict)

    def artifact(self, key: str, needed_by: str) -> Any:
        if key not in self.artifacts:
            raise EdgeqError(f"pass '{needed_by}' needs the result of '{key}', which has not run",
                             fix=f"run '{key}' earlier in the pipeline")
        return self.artifacts[key]


class Pass(ABC):
    """A graph transformation. Options are typed constructor arguments."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        """Raise an EdgeqError if the pass cannot run on this graph/context."""

    @abstractmethod
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        ...

    def ensures(self, graph: Graph, ctx: PassContext) -> None:
        """Raise if the pass's postconditions do not hold."""

    def __call__(self, graph: Graph, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx if ctx is not None else PassContext()
        self.requires(graph, ctx)
        for instrument in ctx.instruments:
            instrument.before_pass(self, graph, ctx)
        start = time.perf_counter()
        result = self.run(graph, ctx)
        self.ensures(result.graph, ctx)
        if not isinstance(self, PassManager):
            ctx.records.append(PassRecord(self.name, result.modified, dict(result.stats),
                                          time.perf_counter() - start))
            release_file_pages()  # weights this pass read need not stay resident
        for instrument in ctx.instruments:
            instrument.after_pass(self, result, ctx)
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PassManager(Pass):
    """Runs passes in order; itself a pass, so pipelines nest. A failure names the failing pass
    and every pass that ran before it."""

    name = "pipeline"

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


# ---- instruments ----------------------------------------------------------------------


class TimingInstrument(Instrument):
    """Wall time of every pass, in run order."""

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
    """Saves the graph after the named passes (all when `after` is empty)."""

    def __init__(self, directory: str | Path, after: Sequence[str] = ()) -> None:
        self.directory = Path(directory)
        self.after = set(after)
        self.count = 0

    def after_pass(self, pass_, result, ctx):
        if isinstance(pass_, PassManager) or (self.after and pass_.name not in self.after):
            return
        from edgeq.ir import save

        self.count += 1
        save(result.graph, self.directory / f"{self.count:02d}_{pass_.name}.onnx")
