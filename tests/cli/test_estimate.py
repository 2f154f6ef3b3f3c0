"""edgeq.cli.estimate: `edgeq estimate` reaches the cost model of any target that has one, hands
it only the device flags given, and refuses targets and flags that do not fit in one line."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
import pytest

from edgeq import registry
from edgeq.metadata import INPUT_SHAPES_KEY
from edgeq.options import CompileOptions
from edgeq.targets.base import CostModel

CALLS: list[tuple[Path, dict]] = []


@dataclass(frozen=True)
class _Priced:
    """What a cost model's estimate returns: text and JSON."""

    model: str

    def to_text(self) -> str:
        return f"priced {self.model}"

    def to_json(self) -> str:
        return json.dumps({"priced": self.model})


@dataclass(frozen=True)
class RecordingCostModel(CostModel):
    """A cost model declared here alone: it records how `estimate` was called."""

    def estimate(self, model, *, input_shapes=None, **device_options):
        CALLS.append((Path(model), {"input_shapes": input_shapes, **device_options}))
        return _Priced(Path(model).name)


@pytest.fixture
def test_targets():
    """Targets declared in this file (one priced by a recording cost model, with and without a
    device; one without a cost model), removed from the registry afterwards."""
    base = registry.get_target("x86-vnni")  # loads the built-in targets before they are saved
    saved = dict(registry._TARGETS)
    for name, cost_model in (("test-priced", RecordingCostModel(unit="units", prices={})),
                             ("test-priced-device", RecordingCostModel(unit="units", prices={}, needs_device=True)),
                             ("test-unpriced", None)):
        registry.register_target(replace(base, name=name, cost_model=cost_model))
    CALLS.clear()
    yield
    registry._TARGETS.clear()
    registry._TARGETS.update(saved)


@pytest.fixture(scope="module")
def compiled_bert(tmp_path_factory, synthetic_bert, bert_samples) -> Path:
    from edgeq.compiler import compile as compile_model

    path = tmp_path_factory.mktemp("estimate") / "bert-x86.onnx"
    compile_model(synthetic_bert, "x86-vnni", CompileOptions(threads=1, verify=False),
                  calibration=bert_samples).save(path)
    return path


def test_the_cost_model_gets_the_model_the_shapes_and_only_the_device_flags_given(run_cli, test_targets,
                                                                                   synthetic_bert):
    code, out, err = run_cli("estimate", synthetic_bert, "-t", "test-priced")
    assert code == 0, err
    assert out.strip() == f"priced {synthetic_bert.name}"
    code, out, err = run_cli("estimate", synthetic_bert, "-t", "test-priced-device", "--device", "d1", "--fps", "30",
                             "--input-shape", "input_ids=1,16", "--json")
    assert code == 0, err
    assert json.loads(out) == {"priced": synthetic_bert.name}
    assert CALLS == [(synthetic_bert, {"input_shapes": None}),
                     (synthetic_bert, {"input_shapes": {"input_ids": [1, 16]}, "device": "d1", "fps": 30.0})]


def test_a_target_without_a_cost_model_names_those_with_one(run_cli, test_targets, synthetic_bert):
    code, out, err = run_cli("estimate", synthetic_bert, "-t", "test-unpriced")
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    priced = [name for name, t in registry.targets().items() if t.cost_model is not None]
    assert "test-priced" in priced and "test-unpriced" not in priced
    assert line == f"error: target test-unpriced has no cost model (use a target that has one: {', '.join(priced)})"
    assert CALLS == []


def test_a_cost_model_that_prices_a_device_needs_device(run_cli, test_targets, synthetic_bert):
    code, _, err = run_cli("estimate", synthetic_bert, "-t", "test-priced-device")
    assert code == 2
    assert err.strip() == "error: the cost model of target test-priced-device prices a device (add --device D)"
    code, _, err = run_cli("estimate", synthetic_bert, "-t", "test-priced", "--device", "d1")
    assert code == 2 and "--device applies to targets whose cost model needs a device" in err
    code, _, err = run_cli("estimate", synthetic_bert, "-t", "test-priced-device", "--fps", "30")
    assert code == 2 and "add --device D" in err
    assert CALLS == []


def test_every_registered_target_with_a_cost_model_can_be_asked(run_cli, test_targets, synthetic_bert):
    """A device-pricing cost model of a registered target refuses a missing --device in one line."""
    for name, target in registry.targets().items():
        if target.cost_model is not None and target.cost_model.needs_device:
            code, _, err = run_cli("estimate", synthetic_bert, "-t", name)
            assert code == 2 and err.strip().endswith("prices a device (add --device D)"), name


def test_a_bad_input_shape_is_a_usage_error(run_cli, test_targets, synthetic_bert):
    code, _, err = run_cli("estimate", synthetic_bert, "-t", "test-priced", "--input-shape", "input_ids=1,x")
    assert code == 2 and "is not NAME=D0,D1,..." in err
    assert CALLS == []


def test_x86_estimate_prices_a_compiled_model(run_cli, compiled_bert):
    shapes = ["--input-shape", "input_ids=1,16", "--input-shape", "attention_mask=1,16",
              "--input-shape", "token_type_ids=1,16"]
    code, out, err = run_cli("estimate", compiled_bert, "-t", "x86-vnni", *shapes)
    assert code == 0, err
    assert "total: " in out
    code, out, err = run_cli("estimate", compiled_bert, "-t", "x86-vnni", "--json", *shapes)
    assert code == 0, err
    report = json.loads(out)
    assert report["total"] > 0 and report["unit"] == registry.get_target("x86-vnni").cost_model.unit
    # no flag: the shapes the compile recorded (its first calibration sample's)
    code, out, err = run_cli("estimate", compiled_bert, "-t", "x86-vnni", "--json")
    assert code == 0, err
    recorded = json.loads(out)
    assert recorded["shapes_from"] == "recorded at compile time" and recorded["total"] == report["total"]
    assert recorded["input_shapes"] == {"input_ids": [1, 16], "attention_mask": [1, 16], "token_type_ids": [1, 16]}


def test_x86_estimate_without_recorded_shapes_names_the_flag(run_cli, compiled_bert, tmp_path):
    model = onnx.load(str(compiled_bert))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != INPUT_SHAPES_KEY]
    assert len(kept) < len(model.metadata_props)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, dict(kept))
    onnx.save(model, str(tmp_path / "unrecorded.onnx"))
    code, out, err = run_cli("estimate", tmp_path / "unrecorded.onnx", "-t", "x86-vnni")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "--input-shape" in err
