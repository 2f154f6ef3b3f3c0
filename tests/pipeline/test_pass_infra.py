"""PassManager nesting and failure reporting, and the instruments (timing, verify, dump)."""

from __future__ import annotations

import time
from dataclasses import FrozenInstanceError

import numpy as np
import onnx
import pytest

import edgeq
from edgeq.errors import GraphError, OptionError, PassError, PostconditionError, PreconditionError
from edgeq.ir import Graph, Value
from edgeq.pipeline import (
    ArtifactKey,
    DumpInstrument,
    Instrument,
    Pass,
    PassContext,
    PassManager,
    PassResult,
    TimingInstrument,
    VerifyInstrument,
    leaf_records,
)
from edgeq.pipeline.artifacts import QUANT_PLAN
from edgeq.passes.dead_code_elimination import DeadCodeElimination
from edgeq.passes.identity_elimination import IdentityElimination
from tests.passes.helpers import model, op_types, run, vi


TRACE: ArtifactKey[list[str]] = ArtifactKey("trace of the passes that ran", "the test passes")


class Named(Pass):
    """Does nothing; remembers that it ran (in the context's artifacts)."""

    def __init__(self, name: str, *, modify_times: int = 0, sleep: float = 0.0):
        self.name = name  # type: ignore[misc]
        self.modify_times = modify_times
        self.sleep = sleep
        self.calls = 0

    def run(self, graph, ctx):
        self.calls += 1
        ctx.artifacts.setdefault(TRACE, []).append(self.name)
        if self.sleep:
            time.sleep(self.sleep)
        return PassResult(graph, self.calls <= self.modify_times, {"calls": self.calls})


class Fails(Pass):
    name = "fails"

    def __init__(self, error: BaseException):
        self.error = error

    def run(self, graph, ctx):
        raise self.error


class NeedsTarget(Pass):
    name = "needs-target"

    def requires(self, graph, ctx):
        if ctx.target is None:
            raise OptionError("needs-target wants a target")

    def run(self, graph, ctx):
        return PassResult(graph, False)


class BrokenPromise(Pass):
    name = "broken-promise"

    def run(self, graph, ctx):
        return PassResult(graph, False)

    def ensures(self, graph, ctx):
        raise GraphError("postcondition violated")


class DanglingInput(Pass):
    """Breaks an IR invariant: an op reads a value nothing defines."""

    name = "dangling-input"

    def run(self, graph, ctx):
        ghost = graph.add_value(Value("ghost", onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, [2])))
        graph.add_op("Relu", [ghost], ["ghost_relu"])
        return PassResult(graph, True)


class UnknownOp(Pass):
    """Leaves the IR invariants intact but writes an op onnx does not know."""

    name = "unknown-op"

    def run(self, graph, ctx):
        for op in graph.ops():
            if op.op_type == "Relu":
                op.op_type = "NoSuchOp"
        return PassResult(graph, True)


def _tiny() -> Graph:
    """x -> Identity -> Relu -> y."""
    return edgeq.load(model([onnx.helper.make_node("Identity", ["x"], ["i"]),
                             onnx.helper.make_node("Relu", ["i"], ["y"])],
                            [vi("x", [2])], [vi("y", [2])]))


def _trace(ctx: PassContext) -> list[str]:
    return ctx.artifacts.get(TRACE, [])


# ---- nesting ----------------------------------------------------------------------------


def test_nested_pipelines_run_in_order_and_records_name_each_leaf_pass():
    inner = PassManager([Named("b"), PassManager([Named("c")], name="innermost"), Named("d")], name="inner")
    outer = PassManager([Named("a"), inner, Named("e")], name="outer")
    ctx = PassContext()
    result = outer(_tiny(), ctx)
    assert _trace(ctx) == ["a", "b", "c", "d", "e"]
    # Records come in completion order, pipelines after their passes, each at its depth; a
    # pipeline's stats count what it ran.
    assert [(r.name, r.depth, r.pipeline) for r in ctx.records] == [
        ("a", 1, False), ("b", 2, False), ("c", 3, False), ("innermost", 2, True), ("d", 2, False),
        ("inner", 1, True), ("e", 1, False), ("outer", 0, True)]
    assert [r.name for r in leaf_records(ctx.records)] == ["a", "b", "c", "d", "e"]
    assert result.stats == {"passes": 3}
    assert result.modified is False


def test_pipeline_is_a_pass_and_results_are_frozen():
    pm = PassManager([Named("a")])
    assert isinstance(pm, Pass)
    result = pm(_tiny())  # a context is made when none is given
    with pytest.raises(FrozenInstanceError):
        result.modified = True  # type: ignore[misc]


def test_failure_names_failing_pass_and_every_pass_before_it_across_nesting():
    cause = RuntimeError("boom")
    inner = PassManager([Named("b"), PassManager([Named("c"), Fails(cause)], name="deep"), Named("never")],
                        name="inner")
    outer = PassManager([Named("a"), inner, Named("after")], name="outer")
    ctx = PassContext()
    with pytest.raises(PassError) as info:
        outer(_tiny(), ctx)
    err = info.value
    assert err.pass_name == "fails"
    assert err.ran_before == ["a", "b", "c"]
    assert err.cause is cause and err.__cause__ is cause
    assert str(err) == "pass 'fails' failed: RuntimeError: boom [passes run before it: a, b, c]"
    assert "\n" not in str(err)
    assert _trace(ctx) == ["a", "b", "c"]  # nothing ran after the failure
    assert err.exit_code == 1  # not a user error: internal


def test_user_error_inside_a_pass_keeps_its_exit_code_and_message():
    outer = PassManager([Named("a"), Fails(OptionError("bad option", fix="use another"))])
    with pytest.raises(PassError) as info:
        outer(_tiny(), PassContext())
    assert info.value.exit_code == 2
    assert str(info.value) == "pass 'fails' failed: bad option (use another) [passes run before it: a]"


def test_first_pass_failing_says_none_ran_before():
    with pytest.raises(PassError, match=r"\[passes run before it: none\]"):
        PassManager([Fails(ValueError("x"))])(_tiny(), PassContext())


def test_requires_and_ensures_failures_name_the_pass():
    with pytest.raises(PassError) as info:
        PassManager([Named("a"), NeedsTarget()])(_tiny(), PassContext())
    assert info.value.pass_name == "needs-target" and info.value.ran_before == ["a"]
    assert "needs-target wants a target" in str(info.value)
    with pytest.raises(PassError) as info:
        PassManager([BrokenPromise(), Named("b")])(_tiny(), PassContext())
    assert info.value.pass_name == "broken-promise" and "postcondition violated" in str(info.value)


def test_fixed_point_repeats_until_nothing_changes_and_is_capped():
    a, b = Named("a", modify_times=2), Named("b")
    ctx = PassContext()
    result = PassManager([a, b], until_fixed_point=True)(_tiny(), ctx)
    assert a.calls == 3 and b.calls == 3  # two modifying rounds, one quiet round
    assert result.modified is True and result.stats == {"passes": 6}
    forever = Named("forever", modify_times=10**6)
    PassManager([forever], until_fixed_point=True, max_iterations=4)(_tiny(), PassContext())
    assert forever.calls == 4


def test_missing_artifact_names_the_producer_and_the_consumer():
    with pytest.raises(PreconditionError, match="pass 'insert-qdq' needs the quantization plan, which "
                                                "'select-precision' produces") as info:
        PassContext().artifact(QUANT_PLAN, needed_by="insert-qdq")
    assert info.value.exit_code == 2


def test_a_broken_postcondition_is_an_internal_error_whatever_the_pass_raised():
    for raised in (GraphError("postcondition violated"), AssertionError("not what I promised")):
        class Promise(BrokenPromise):
            def ensures(self, graph, ctx, raised=raised):
                raise raised

        with pytest.raises(PassError) as info:
            PassManager([Promise()])(_tiny(), PassContext())
        assert isinstance(info.value.cause, PostconditionError)
        assert info.value.exit_code == 1  # a bug in edgeq, not the user's input
        assert str(raised) in str(info.value)


# ---- instruments ---------------------------------------------------------------------------


def test_timing_records_every_pass_including_pipelines_in_completion_order():
    timing = TimingInstrument()
    inner = PassManager([Named("b", sleep=0.02), Named("c")], name="inner")
    outer = PassManager([Named("a"), inner, Named("d", sleep=0.01)], name="outer")
    outer(_tiny(), PassContext(instruments=[timing]))
    names = [n for n, _ in timing.seconds]
    assert names == ["a", "b", "c", "inner", "d", "outer"]
    seconds = dict(timing.seconds)
    assert seconds["b"] >= 0.02 and seconds["d"] >= 0.01
    assert seconds["inner"] >= seconds["b"] + seconds["c"]
    assert seconds["outer"] >= seconds["inner"] + seconds["d"]


def test_instruments_see_before_and_after_of_each_pass_and_do_not_change_results():
    class Log(Instrument):
        def __init__(self):
            self.events = []

        def before_pass(self, pass_, graph, ctx):
            self.events.append(("before", pass_.name, len(graph.ops())))

        def after_pass(self, pass_, result, ctx):
            self.events.append(("after", pass_.name, len(result.graph.ops())))

    log = Log()
    graph = _tiny()
    PassManager([IdentityElimination(), DeadCodeElimination()], name="p")(graph, PassContext(instruments=[log]))
    assert log.events == [("before", "p", 2), ("before", "identity-elimination", 2),
                          ("after", "identity-elimination", 1), ("before", "dead-code-elimination", 1),
                          ("after", "dead-code-elimination", 1), ("after", "p", 1)]
    assert op_types(graph) == ["Relu"]


def test_verify_instrument_catches_the_pass_that_breaks_an_invariant():
    ctx = PassContext(instruments=[VerifyInstrument()])
    after = Named("after")
    with pytest.raises(PassError) as info:
        PassManager([Named("a"), DanglingInput(), after])(_tiny(), ctx)
    assert info.value.pass_name == "dangling-input"
    assert info.value.ran_before == ["a"]
    assert isinstance(info.value.cause, GraphError)
    assert "ghost" in str(info.value)
    assert after.calls == 0
    # Without the instrument the broken graph goes through unnoticed.
    PassManager([DanglingInput(), Named("b")])(_tiny(), PassContext())


def test_verify_instrument_with_onnxruntime_catches_what_only_onnx_rejects():
    graph = _tiny()
    PassManager([UnknownOp()])(graph, PassContext(instruments=[VerifyInstrument()]))  # IR-valid
    with pytest.raises(PassError) as info:
        PassManager([UnknownOp()])(_tiny(), PassContext(instruments=[VerifyInstrument(with_onnxruntime=True)]))
    assert info.value.pass_name == "unknown-op"
    assert "NoSuchOp" in str(info.value)


def test_dump_instrument_writes_one_loadable_file_per_leaf_pass(tmp_path):
    dump = DumpInstrument(tmp_path / "dumps")  # created on demand
    pipeline = PassManager([IdentityElimination(), PassManager([DeadCodeElimination()], name="nested")])
    pipeline(_tiny(), PassContext(instruments=[dump]))
    files = sorted(p.name for p in (tmp_path / "dumps").iterdir())
    assert files == ["01_identity-elimination.onnx", "02_dead-code-elimination.onnx"]
    first = onnx.load(str(tmp_path / "dumps" / files[0]))
    onnx.checker.check_model(first, full_check=True)
    assert [n.op_type for n in first.graph.node] == ["Relu"]  # the state after that pass
    x = np.array([-1.0, 2.0], np.float32)
    assert np.array_equal(run(first, {"x": x})[0], np.maximum(x, 0))


def test_dump_instrument_after_filter(tmp_path):
    dump = DumpInstrument(tmp_path, after=["dead-code-elimination"])
    PassManager([IdentityElimination(), DeadCodeElimination(), DeadCodeElimination()])(
        _tiny(), PassContext(instruments=[dump]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01_dead-code-elimination.onnx",
                                                          "02_dead-code-elimination.onnx"]


def test_release_pages_runs_after_each_pass_but_not_after_pipelines(monkeypatch):
    from edgeq.pipeline import ReleasePagesInstrument

    released = []
    monkeypatch.setattr("edgeq.ir.files.release_file_pages", lambda: released.append(1))
    PassManager([Named("a"), PassManager([Named("b")], name="inner")])(
        _tiny(), PassContext(instruments=[ReleasePagesInstrument()]))
    assert len(released) == 2
    PassManager([Named("a")])(_tiny(), PassContext())  # without the instrument nothing is released
    assert len(released) == 2


def test_compile_takes_instruments_and_reports_every_leaf_pass_with_its_time(synthetic_bert, bert_feeds):
    from edgeq.options import CompileOptions

    timing, log = TimingInstrument(), []

    class Seen(Instrument):
        def after_pass(self, pass_, result, ctx):
            log.append(pass_.name)

    compiled = edgeq.compile(synthetic_bert, "x86-vnni", CompileOptions(verify=False), calibration=bert_feeds[:3],
                             instruments=[timing, Seen()])
    leaf = [name for name, _ in timing.seconds if not name.endswith("-pipeline")]
    assert log == [name for name, _ in timing.seconds]  # the user's instruments saw every pass
    assert [row.name for row in compiled.report.passes] == leaf
    assert compiled.report.passes[0].name == "convert-opset" and "insert-qdq" in leaf
    assert all(row.seconds >= 0 for row in compiled.report.passes)
