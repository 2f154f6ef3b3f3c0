"""The pass and target registries: unknown names list the known ones; third parties register."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from edgeq import registry
from edgeq.errors import UnknownPassError, UnknownTargetError
from edgeq.pipeline import Pass, PassResult
from edgeq.targets.base import OpRule, QSpec, Target

BUILTIN_PASSES = {"shape-inference", "constant-folding", "dead-code-elimination", "identity-elimination",
                  "topological-sort", "select-precision", "smooth-quant", "calibrate", "insert-qdq"}
BUILTIN_TARGETS = {"x86-vnni", "x86-avx2", "x86-amx"}


class ThirdPartyPass(Pass):
    name = "test-third-party-pass"
    description = "a pass from outside edgeq"

    def run(self, graph, ctx):
        return PassResult(graph, False, {"seen_ops": len(graph.ops())})


THIRD_PARTY_TARGET = Target(
    name="test-npu", description="an NPU from outside edgeq",
    ops={"MatMul": OpRule(activations=(QSpec("int8"),), weight=QSpec("int8"))},
    activation=QSpec("int8"), weight=QSpec("int8"))


@pytest.fixture
def clean_registry():
    """Whatever a test registers is gone afterwards (the plugin scan is re-run on next use)."""
    passes, targets = dict(registry._PASSES), dict(registry._TARGETS)
    yield
    registry._PASSES.clear()
    registry._PASSES.update(passes)
    registry._TARGETS.clear()
    registry._TARGETS.update(targets)
    registry._load_plugins.cache_clear()


def test_builtins_are_registered_under_their_file_names():
    known = registry.passes()
    assert BUILTIN_PASSES <= set(known)
    for name, cls in known.items():
        assert cls.name == name
        assert issubclass(cls, Pass)
        if name in BUILTIN_PASSES:  # one public pass per file; file name = registry name
            assert cls.__module__ == "edgeq.passes." + name.replace("-", "_")
    assert BUILTIN_TARGETS <= set(registry.targets())
    assert list(known) == sorted(known)


def test_unknown_pass_error_lists_every_known_pass():
    with pytest.raises(UnknownPassError) as info:
        registry.get_pass("constant-foldnig")
    message = str(info.value)
    assert message.startswith("unknown pass 'constant-foldnig'")
    assert info.value.exit_code == 2
    listed = message.split("known passes: ", 1)[1].rstrip(")").split(", ")
    assert listed == list(registry.passes())


def test_unknown_target_error_lists_every_known_target():
    with pytest.raises(UnknownTargetError) as info:
        registry.get_target("x86-vnni2")
    message = str(info.value)
    assert message.startswith("unknown target 'x86-vnni2'")
    listed = message.split("known targets: ", 1)[1].split(";")[0].split(", ")
    assert listed == list(registry.targets())
    assert "edgeq targets" in message


def test_third_party_pass_class_registers_and_is_found(clean_registry, bert_graph):
    assert registry.register_pass(ThirdPartyPass) is ThirdPartyPass  # usable as a decorator
    assert registry.get_pass("test-third-party-pass") is ThirdPartyPass
    assert "test-third-party-pass" in registry.passes()
    result = registry.get_pass("test-third-party-pass")()(bert_graph)
    assert result.stats["seen_ops"] == len(bert_graph.ops())
    registry.register_pass(ThirdPartyPass)  # registering the same class again is harmless


def test_a_second_pass_under_a_taken_name_is_refused(clean_registry):
    impostor = type("Impostor", (ThirdPartyPass,), {"name": "constant-folding"})
    with pytest.raises(ValueError, match="two passes are named 'constant-folding'"):
        registry.register_pass(impostor)
    assert registry.get_pass("constant-folding").__name__ == "ConstantFolding"


def test_entry_points_register_third_party_passes_and_targets(clean_registry, monkeypatch):
    groups = {"edgeq.passes": [SimpleNamespace(name="tp", load=lambda: ThirdPartyPass)],
              "edgeq.targets": [SimpleNamespace(name="npu", load=lambda: THIRD_PARTY_TARGET)]}
    monkeypatch.setattr(registry, "entry_points", lambda group: groups.get(group, []))
    registry._load_plugins.cache_clear()
    assert registry.get_pass("test-third-party-pass") is ThirdPartyPass
    assert registry.get_target("test-npu") is THIRD_PARTY_TARGET
    assert BUILTIN_TARGETS <= set(registry.targets())  # built-ins are still there


def _broken_import():
    raise ModuleNotFoundError("No module named 'npu_sdk'")


@pytest.mark.parametrize("group,load,problem", [
    ("edgeq.passes", _broken_import, "ModuleNotFoundError: No module named 'npu_sdk'"),
    ("edgeq.passes", lambda: object, "is not a Pass subclass"),
    ("edgeq.targets", lambda: "x86-vnni", "is not an edgeq.targets.base.Target"),
    ("edgeq.passes", lambda: type("Clash", (ThirdPartyPass,), {"name": "insert-qdq"}), "two passes are named"),
])
def test_a_broken_plugin_is_a_user_facing_error_naming_it(clean_registry, monkeypatch, capsys, group, load, problem):
    entry = SimpleNamespace(name="npu", value="npu_plugin:thing", load=load)
    monkeypatch.setattr(registry, "entry_points", lambda **kw: [entry] if kw["group"] == group else [])
    registry._load_plugins.cache_clear()
    with pytest.raises(registry.EdgeqError) as info:
        registry.passes()
    message = str(info.value)
    assert message.startswith(f"plugin 'npu' ({group} entry point 'npu_plugin:thing') cannot be used: ")
    assert problem in message and info.value.exit_code == 2
    from edgeq.cli import main

    assert main(["passes"]) == 2  # the CLI says so in one line instead of an internal error
    err = capsys.readouterr().err
    assert err.startswith("error: plugin 'npu'") and len(err.strip().splitlines()) == 1
