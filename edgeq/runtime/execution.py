"""Where a target's output runs, as data (re-exported by edgeq.targets.base, read by
edgeq.runtime): the ONNX Runtime provider and how to get it (built in, or a plugin library
from a PyPI package installed by an extra), its options and per-device settings, session
settings, the precision of the ops left in float, how placement is checked, and the QDQ layout
that runtime's integer kernels take where it differs from the target's.

A leaf module: it imports nothing of edgeq at run time, so every runtime module may read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from edgeq.targets.base import OpRule


@dataclass(frozen=True)
class PluginLibrary:
    """An execution provider that ONNX Runtime (>= 1.23) loads as a plugin library shipped in a
    PyPI package: registered with `register_execution_provider_library`, attached to a session
    with `SessionOptions.add_provider_for_devices` on the devices it lists."""

    package: str                     # the PyPI distribution (onnxruntime-ep-openvino)
    module: str                      # its import name; `module.get_library_path()` gives the library
    extra: str                       # edgeq's extra that installs it: pip install 'edgeq[<extra>]'
    device_type: str = "CPU"         # the OrtHardwareDeviceType the session runs on ("NPU|CPU": the first listed)
    device_metadata: tuple[tuple[str, str], ...] = ()  # ep_metadata the chosen OrtEpDevice carries
    # Import name of the same runtime used without ONNX Runtime where the plugin lists no device
    # for this machine (OpenVINO's plugin lists Intel devices only; its CPU plugin runs on AMD too).
    direct_runtime: str | None = None
    # The name ONNX Runtime registers the library under (None: edgeq_<module>). Some plugins name
    # their provider and devices after it (onnxruntime-qnn): give it the provider's own name.
    registration_name: str | None = None


@dataclass(frozen=True)
class DeviceConfig:
    """Per-device runtime settings, given to the provider as its `load_config` JSON
    ({device: {key: value}}): the precision hint of ops left in float, the thread count."""

    device: str = "CPU"
    precision_hint: str | None = None          # INFERENCE_PRECISION_HINT of the deployment: f32, bf16
    reference_hint: str = "f32"                # the float reference runs at full precision
    threads_key: str | None = "INFERENCE_NUM_THREADS"
    settings: tuple[tuple[str, str], ...] = ()  # further per-device keys, as strings

    def load_config(self, threads: int = 0, *, reference: bool = False) -> str:
        entries: dict[str, str] = dict(self.settings)
        hint = self.reference_hint if reference else self.precision_hint
        if hint:
            entries["INFERENCE_PRECISION_HINT"] = hint
        if threads and self.threads_key:
            entries[self.threads_key] = str(threads)
        return json.dumps({self.device: entries}, sort_keys=True)


class ActivationPlacement(str, Enum):
    """Where an activation's QuantizeLinear goes when data movement (Reshape, Transpose) lies
    between the tensor and the op that reads it quantized."""

    SOURCE = "source"           # Q once after the producer, the movement replayed on integers, DQ before
                                # the reader (ONNX Runtime fuses producer + Q and DQ + reader)
    SOURCE_QDQ = "source-qdq"   # Q -> DQ once after the producer, the movement on the dequantized float
                                # (OpenVINO: a FakeQuantize fused into its producer, LPT moves the
                                # dequantization through the movement into the reader)
    READER = "reader"           # Q -> DQ directly before each reader, after the movement


@dataclass(frozen=True)
class ExecutionDevice:
    """One device a provider compiles for (`--device NAME`): an NPU generation or a SoC, as the
    provider options that select it (QNN's htp_arch, soc_model)."""

    name: str
    description: str
    provider_options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Execution:
    """How a runtime runs the target's output: the ONNX Runtime provider and how to get it, its
    options and session settings, the precision of the ops it leaves in float, how its placement
    is checked, and the QDQ layout its integer kernels take where it differs from the target's."""

    name: str = "cpu"                                   # what --provider NAME picks
    provider: str = "CPUExecutionProvider"
    description: str = "ONNX Runtime's CPU provider (MLAS kernels)"
    plugin: PluginLibrary | None = None                 # None: built into onnxruntime
    device_config: DeviceConfig | None = None           # per-device settings (load_config)
    provider_options: tuple[tuple[str, str], ...] = ()
    session_config: tuple[tuple[str, str], ...] = ()    # e.g. ("session.disable_cpu_ep_fallback", "1")
    high_precision: str = "float32"                     # what kept-high ops run in
    placement_check: str = "ort-optimized-graph"        # edgeq.runtime.placement checker
    ops: Mapping[str, OpRule] | None = None             # op rules replacing the target's on this runtime
    activation_placement: ActivationPlacement = ActivationPlacement.SOURCE
    # The float reference (calibration, the float side of verification and bench) runs on ONNX
    # Runtime's CPU provider: the runtime has no float path (an NPU with CPU fallback disabled).
    reference_on_cpu: bool = False
    # The devices --device picks from (their provider options join `provider_options`); the first
    # is the default. Empty: the provider takes no device choice.
    devices: tuple[ExecutionDevice, ...] = ()
    device: str | None = None                           # set by `for_device`: the one compiled for
    # Session settings that write the provider's precompiled model (ONNX Runtime's EP context:
    # ep.context_enable, ep.context_embed_mode, ep.context_file_path); empty: it writes none.
    context_settings: tuple[tuple[str, str], ...] = ()

    @property
    def providers(self) -> tuple[str, ...]:
        return (self.provider,)

    def for_device(self, name: str | None) -> "Execution | None":
        """This execution compiling for device `name` (None: the default device, if any); None
        when it has no such device (edgeq.runtime.providers.for_device says so to the user)."""
        import dataclasses

        if not self.devices:
            return self if name is None else None
        chosen = self.devices[0] if name is None else next((d for d in self.devices if d.name == name), None)
        if chosen is None:
            return None
        options = dict(self.provider_options)
        options.update(chosen.provider_options)
        return dataclasses.replace(self, provider_options=tuple(options.items()), device=chosen.name)

    @property
    def install_hint(self) -> str:
        return f"pip install 'edgeq[{self.plugin.extra}]'" if self.plugin else "pip install onnxruntime"
