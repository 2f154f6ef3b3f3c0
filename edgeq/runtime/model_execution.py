"""The execution a model is run on by eval and bench: what its compile recorded, or asked for."""

from __future__ import annotations

from edgeq.runtime.execution import Execution
from edgeq.runtime.providers import CPU, ProviderError, availability, for_device, require, resolve, via_text


def for_model(metadata: dict[str, str], target_name: str | None = None,
              provider: str | None = None) -> tuple[Execution, str]:
    """The execution to run a compiled model on: `provider` of `target_name` (either defaulting
    to what the compile recorded in the model's metadata); a recorded one that cannot run here
    gives way to ONNX Runtime's CPU provider. Also a note saying which and why."""
    from edgeq.metadata import DEVICE_KEY, PROVIDER_KEY, TARGET_KEY
    from edgeq.registry import get_target

    target_name = target_name or metadata.get(TARGET_KEY)
    if target_name is None:
        if provider not in (None, CPU.name):
            raise ProviderError(f"--provider {provider} needs a target", fix="pass --target T")
        return CPU, "on cpu (no target given or recorded)"
    target = get_target(target_name)
    device = metadata.get(DEVICE_KEY)  # the NPU generation / SoC it was compiled for
    if provider is not None:
        execution = target.execution_named(provider)
        execution = for_device(execution, device if execution.devices else None)
        found = require(execution)
        return execution, f"on {execution.name} ({execution.provider}{via_text(found)})"
    recorded = metadata.get(PROVIDER_KEY)
    execution = target.execution_named(recorded) if recorded else resolve(target)
    execution = for_device(execution, device if execution.devices else None)
    found = availability(execution)
    if found.via != "onnxruntime" and recorded:
        fallback = resolve(target)
        return fallback, f"on {fallback.name}: the recorded {execution.name} does not run here ({found.reason})"
    return execution, f"on {execution.name} ({execution.provider}{via_text(found)})"

