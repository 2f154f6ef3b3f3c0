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
    device_type: str = "CPU"         # the OrtHardwareDeviceType the session runs on
    device_metadata: tuple[tuple[str, str], ...] = ()  # ep_metadata the chosen OrtEpDevice carries
    # Import name of the same runtime used without ONNX Runtime where the plugin lists no device
    # for this machine (OpenVINO's plugin lists Intel devices only; its CPU plugin runs on AMD too).
    direct_runtime: str | None = None


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

    @property
    def providers(self) -> tuple[str, ...]:
        return (self.provider,)

    @property
    def install_hint(self) -> str:
        return f"pip install 'edgeq[{self.plugin.extra}]'" if self.plugin else "pip install onnxruntime"
