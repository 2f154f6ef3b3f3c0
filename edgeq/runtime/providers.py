"""Execution providers from a target's `Execution` data: which of a target's executions runs
here, how a plugin provider is found and registered, and the one-line errors when it cannot be.

- A built-in provider (the CPU provider) is available when onnxruntime lists it.
- A plugin provider (`Execution.plugin`, e.g. OpenVINO's `onnxruntime-ep-openvino`) is a shared
  library in a PyPI package, installed by one of edgeq's extras: it is registered once per
  process with `onnxruntime.register_execution_provider_library`, and a session takes it on the
  `OrtEpDevice`s it lists for the declared device (`SessionOptions.add_provider_for_devices`).
- Where the plugin lists no device for this machine (OpenVINO's lists Intel hardware only) but
  the same runtime is importable directly (`PluginLibrary.direct_runtime`), an execution named
  explicitly runs there (edgeq.runtime.openvino_direct); a target's default never picks it.
"""

from __future__ import annotations

import importlib
import os
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnxruntime as ort

from edgeq.errors import EdgeqError
from edgeq.runtime.execution import Execution

if TYPE_CHECKING:
    from edgeq.targets.base import Target

CPU = Execution()  # ONNX Runtime's CPU provider, the default of every session


class ProviderError(EdgeqError):
    """An execution provider is not installed or cannot run on this machine."""


@dataclass(frozen=True)
class Availability:
    """Whether an execution runs here, and through what: "onnxruntime" (the provider in an ORT
    session), "direct" (the plugin's runtime without ORT), or None with the reason."""

    execution: Execution
    via: str | None
    reason: str = ""

    @property
    def runs(self) -> bool:
        return self.via is not None


_REGISTERED: dict[str, str] = {}  # plugin module -> registration name (once per process)


def availability(execution: Execution) -> Availability:
    """Whether `execution` can open sessions here (never raises)."""
    plugin = execution.plugin
    if plugin is None:
        if execution.provider in ort.get_available_providers():
            return Availability(execution, "onnxruntime")
        return Availability(execution, None, f"this onnxruntime has no {execution.provider}")
    if importlib.util.find_spec(plugin.module) is None:
        return Availability(execution, None, f"{plugin.package} is not installed ({execution.install_hint})")
    try:
        devices = ep_devices(execution)
    except ProviderError as err:
        return Availability(execution, None, err.problem)
    if devices:
        return Availability(execution, "onnxruntime")
    reason = (f"{plugin.package} lists no {plugin.device_type} device on this machine"
              f" ({_cpu_vendor()} CPU)")
    if plugin.direct_runtime and importlib.util.find_spec(plugin.direct_runtime) is not None:
        return Availability(execution, "direct", reason + f"; running through the {plugin.direct_runtime} package")
    return Availability(execution, None, reason)


# Picks the default provider where --provider is not given (e.g. EDGEQ_PROVIDER=cpu keeps a
# machine with the OpenVINO plugin on ONNX Runtime's CPU provider; the test suite sets it).
PROVIDER_ENV = "EDGEQ_PROVIDER"


def resolve(target: Target, name: str | None = None) -> Execution:
    """The execution to compile and run for: the one named (--provider, else the environment's
    EDGEQ_PROVIDER; an error if it cannot run here), or the first of the target's executions whose
    provider ONNX Runtime runs here."""
    preferred = os.environ.get(PROVIDER_ENV)
    if name is None and preferred and any(e.name == preferred for e in target.executions):
        name = preferred  # a preference: a target without that provider keeps its own order
    if name is not None:
        execution = target.execution_named(name)
        require(execution)
        return execution
    for execution in target.executions:
        if availability(execution).via == "onnxruntime":
            return execution
    reasons = "; ".join(f"{e.name}: {availability(e).reason}" for e in target.executions)
    raise ProviderError(f"no provider of target {target.name} runs here ({reasons})",
                        fix="install one (pip install onnxruntime, or the extra named)")


def require(execution: Execution) -> Availability:
    """The execution's availability; a one-line ProviderError naming the fix when it cannot run."""
    found = availability(execution)
    if found.runs:
        return found
    plugin = execution.plugin
    if plugin is not None and importlib.util.find_spec(plugin.module) is None:
        raise ProviderError(f"the {execution.name} execution provider ({execution.provider}) is not installed",
                            fix=f"{execution.install_hint}, or pick another with --provider")
    raise ProviderError(f"the {execution.name} execution provider cannot run here: {found.reason}",
                        fix="pick another with --provider")


def ep_devices(execution: Execution) -> list:
    """The plugin's OrtEpDevices for the execution's device (registering the plugin first)."""
    plugin = execution.plugin
    if plugin is None:
        return []
    register(execution)
    wanted = dict(plugin.device_metadata)
    # "NPU|CPU": the NPU where the plugin lists one, else its CPU device (QNN's HTP simulator on x86).
    for device_type in plugin.device_type.split("|"):
        found = []
        for device in ort.get_ep_devices():
            if device.ep_name != execution.provider:
                continue
            if device.device.type != getattr(ort.OrtHardwareDeviceType, device_type):
                continue
            metadata = dict(device.ep_metadata)
            if all(metadata.get(k) == v for k, v in wanted.items()):
                found.append(device)
        if found:
            return found
    return []


def for_device(execution: Execution, name: str | None) -> Execution:
    """`execution` compiling for device `name` (--device; None: its default device)."""
    chosen = execution.for_device(name)
    if chosen is None:
        known = ", ".join(d.name for d in execution.devices)
        if not known:
            raise ProviderError(f"the {execution.name} execution provider takes no --device",
                                fix="drop --device")
        raise ProviderError(f"the {execution.name} execution provider has no device {name!r}",
                            fix=f"use --device with one of {known}")
    return chosen


def register(execution: Execution) -> None:
    """Register the plugin library with ONNX Runtime (once per process)."""
    plugin = execution.plugin
    if plugin is None or plugin.module in _REGISTERED:
        return
    if not hasattr(ort, "register_execution_provider_library"):
        raise ProviderError(f"onnxruntime {ort.__version__} cannot load provider plugins",
                            fix="pip install 'onnxruntime>=1.23'")
    try:
        module = importlib.import_module(plugin.module)
    except ImportError as err:
        raise ProviderError(f"the {execution.name} execution provider ({execution.provider}) is not installed",
                            fix=f"{execution.install_hint}, or pick another with --provider") from err
    name = plugin.registration_name or f"edgeq_{plugin.module}"
    try:
        ort.register_execution_provider_library(name, module.get_library_path())
    except Exception as err:  # noqa: BLE001 - ORT raises its own types; already registered is fine
        if "already registered" not in str(err):
            raise ProviderError(f"onnxruntime could not load {plugin.package}: {err}",
                                fix=f"reinstall it ({execution.install_hint})") from err
    _REGISTERED[plugin.module] = name


def provider_options(execution: Execution, threads: int = 0, *, reference: bool = False) -> dict[str, str]:
    """The provider's options as ORT takes them: the declared ones plus `load_config` from the
    device settings (the float reference at full precision)."""
    options = dict(execution.provider_options)
    if execution.device_config is not None:
        options["load_config"] = execution.device_config.load_config(threads, reference=reference)
    return options


def _cpu_vendor() -> str:
    try:
        for device in ort.get_ep_devices():
            if device.ep_name == "CPUExecutionProvider":
                return device.device.vendor or "unknown"
    except Exception:  # noqa: BLE001 - older onnxruntime
        pass
    return "unknown"


def via_text(found: Availability) -> str:
    return "" if found.via == "onnxruntime" else f" via the {found.execution.plugin.direct_runtime} package"
