"""edgeq.cli.catalog: `edgeq passes` and `edgeq targets [show T]` list the registry."""

from __future__ import annotations

import json

from edgeq import registry


def test_passes_lists_every_registered_pass(run_cli):
    code, out, _ = run_cli("passes")
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines()]
    assert listed == list(registry.passes())
    code, out, _ = run_cli("passes", "--json")
    assert json.loads(out) == {n: c.description for n, c in registry.passes().items()}


def test_targets_and_targets_show(run_cli):
    code, out, _ = run_cli("targets")
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == list(registry.targets())
    code, out, _ = run_cli("targets", "show", "x86-vnni")
    assert code == 0
    assert out.startswith("x86-vnni: ")
    assert "weights (default):     int8 sym channel" in out
    assert "activations (default): uint8 asym tensor" in out
    target = registry.get_target("x86-vnni")
    assert "pipeline: " + " -> ".join(target.default_pipeline) in out
    code, out, _ = run_cli("targets", "show", "x86-vnni", "--json")
    data = json.loads(out)
    assert data["name"] == "x86-vnni" and data["pipeline"] == list(target.default_pipeline)
    assert set(data["ops"]) == set(target.ops)


def test_targets_show_of_an_unknown_target_is_a_user_error(run_cli):
    code, out, err = run_cli("targets", "show", "no-such-target")
    assert code == 2 and out == ""
    assert err.startswith("error: unknown target 'no-such-target'") and len(err.strip().splitlines()) == 1
