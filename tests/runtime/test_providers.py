"""Executions as data: the session factory reads them, plugin providers are found or refused
with a one-line error, a target picks the first execution that runs here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.registry import get_target
from edgeq.runtime.execution import DeviceConfig, Execution, PluginLibrary
from edgeq.runtime.providers import CPU, ProviderError, availability, provider_options, resolve
from edgeq.runtime.sessions import make_session
from edgeq.targets.base import QSpec, Target
from tests.runtime.models import affine

CPU_SPEC = QSpec("int8")
MISSING = Execution(name="fake", provider="FakeExecutionProvider",
                    plugin=PluginLibrary(package="onnxruntime-ep-fake", module="edgeq_tests_no_such_plugin",
                                         extra="fake"))


def test_the_factory_applies_the_execution_s_session_settings(tmp_path: Path):
    execution = Execution(name="cpu-settings", session_config=(("session.disable_quant_qdq", "1"),
                                                              ("session.intra_op.allow_spinning", "0")))
    session = make_session(affine(tmp_path / "m.onnx", 2.0), threads=1, execution=execution)
    options = session.get_session_options()
    assert options.get_session_config_entry("session.disable_quant_qdq") == "1"
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 1
    assert session.get_providers() == ["CPUExecutionProvider"]
    x = np.ones((1, 4), np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], 2 * x)


def test_device_settings_become_load_config_and_the_reference_runs_at_full_precision():
    execution = Execution(name="dev", device_config=DeviceConfig("CPU", precision_hint="bf16",
                                                                 settings=(("PERFORMANCE_HINT", "LATENCY"),)),
                          provider_options=(("device_type", "CPU"),))
    options = provider_options(execution, threads=2)
    assert options["device_type"] == "CPU"
    assert json.loads(options["load_config"]) == {"CPU": {"INFERENCE_NUM_THREADS": "2", "PERFORMANCE_HINT": "LATENCY",
                                                          "INFERENCE_PRECISION_HINT": "bf16"}}
    reference = json.loads(provider_options(execution, reference=True)["load_config"])
    assert reference == {"CPU": {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}}


def test_a_missing_plugin_is_a_one_line_error_naming_the_extra(tmp_path: Path):
    assert not availability(MISSING).runs
    with pytest.raises(ProviderError) as err:
        make_session(affine(tmp_path / "m.onnx", 2.0), execution=MISSING)
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, EdgeqError)
    assert "FakeExecutionProvider" in message and "pip install 'edgeq[fake]'" in message


def test_a_target_runs_on_its_first_available_execution_and_names_others_on_request():
    target = Target(name="t", description="", ops={}, activation=CPU_SPEC, weight=CPU_SPEC,
                    executions=(MISSING, CPU))
    assert resolve(target) == CPU
    assert resolve(target, "cpu") == CPU
    with pytest.raises(ProviderError, match=r"edgeq\[fake\]"):
        resolve(target, "fake")
    with pytest.raises(EdgeqError, match=r"no provider 'qnn'.*--provider fake, cpu"):
        resolve(target, "qnn")


def test_x86_targets_prefer_openvino_and_keep_the_cpu_provider():
    for name in ("x86-vnni", "x86-avx2", "x86-amx"):
        target = get_target(name)
        assert [e.name for e in target.executions] == ["openvino", "cpu"]
        openvino = target.execution_named("openvino")
        assert openvino.plugin.extra == "openvino" and openvino.plugin.module == "onnxruntime_ep_openvino"
        assert dict(openvino.session_config)["session.disable_cpu_ep_fallback"] == "1"
        on = target.on(openvino)
        assert on.execution is openvino and on.ops is openvino.ops and on.ops["MatMul"].activations[0].symmetric
        assert target.on(target.execution_named("cpu")).ops is target.ops
    assert get_target("x86-amx").execution_named("openvino").high_precision == "bfloat16"
    assert get_target("x86-vnni").execution_named("openvino").high_precision == "float32"


def test_the_float_reference_and_the_deployment_differ_only_in_the_precision_hint():
    openvino = get_target("x86-amx").execution_named("openvino")
    deploy = json.loads(provider_options(openvino, 4)["load_config"])["CPU"]
    reference = json.loads(provider_options(openvino, 4, reference=True)["load_config"])["CPU"]
    assert deploy == {**reference, "INFERENCE_PRECISION_HINT": "bf16"}
    assert reference["INFERENCE_PRECISION_HINT"] == "f32"


def test_an_execution_is_plain_data():
    fields = {f.name for f in dataclasses.fields(Execution)}
    assert {"provider", "plugin", "device_config", "provider_options", "session_config", "high_precision",
            "placement_check", "ops", "activation_placement"} <= fields
