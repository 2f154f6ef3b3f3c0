"""OpenVINO's runtime used directly (the `openvino` package), for two things ONNX Runtime's
OpenVINO provider does not give:

- a session where the provider's plugin lists no device for this machine (it takes Intel
  hardware only, while OpenVINO's CPU plugin runs on any x86 CPU with AVX2): the same CPU
  plugin and ONNX front end the provider uses, behind the subset of `InferenceSession` that
  edgeq calls (`run`, `get_inputs`, `get_outputs`, `get_providers`);
- the placement check: the runtime model of a compiled network, with the precision every layer
  runs in (`runtimePrecision`), which shows which quantized ops became int8 kernels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.runtime.execution import Execution

_ORT_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "f64": "tensor(double)", "i64": "tensor(int64)",
              "i32": "tensor(int32)", "i8": "tensor(int8)", "u8": "tensor(uint8)", "boolean": "tensor(bool)"}


class OpenVINOError(EdgeqError):
    """OpenVINO could not read or compile the model."""


@dataclass(frozen=True)
class _Arg:
    """What ORT's NodeArg tells edgeq: name, shape (ints, None or names for dynamic dims), type."""

    name: str
    shape: list
    type: str


def _core():
    import openvino

    return openvino.Core()


def compile_model(model: str | os.PathLike | bytes, execution: Execution, threads: int = 0, *,
                  reference: bool = False, extra_config: Mapping[str, str] | None = None):
    """The model compiled by OpenVINO on the execution's device with its settings."""
    import json

    config = execution.device_config
    device = config.device if config is not None else "CPU"
    settings = json.loads(config.load_config(threads, reference=reference))[device] if config is not None else {}
    settings.update(extra_config or {})
    core = _core()
    try:
        network = core.read_model(model if isinstance(model, bytes) else str(Path(model)))
        return core.compile_model(network, device, settings)
    except Exception as err:  # noqa: BLE001 - OpenVINO raises RuntimeError for anything
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OpenVINOError(f"OpenVINO cannot run the model: {first}", fix="use --provider cpu") from err


class OpenVINOSession:
    """An OpenVINO compiled model behind the part of ORT's InferenceSession edgeq uses."""

    def __init__(self, model: str | os.PathLike | bytes, execution: Execution, threads: int = 0, *,
                 reference: bool = False):
        self.compiled = compile_model(model, execution, threads, reference=reference)
        self.request = self.compiled.create_infer_request()
        self.execution = execution

    def get_inputs(self) -> list[_Arg]:
        return [_arg(port) for port in self.compiled.inputs]

    def get_outputs(self) -> list[_Arg]:
        return [_arg(port) for port in self.compiled.outputs]

    def get_providers(self) -> list[str]:
        return [f"{self.execution.provider} (openvino package)"]

    def run(self, output_names: Sequence[str] | None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        names = [o.name for o in self.get_outputs()] if output_names is None else list(output_names)
        inputs = {port.get_any_name(): feed[port.get_any_name()] for port in self.compiled.inputs}
        results = self.request.infer(inputs, share_inputs=True)  # no copy of fed weights
        return [np.array(results[self.compiled.output(name)]) for name in names]


def _arg(port) -> _Arg:
    shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
    return _Arg(port.get_any_name(), shape, _ORT_TYPES.get(port.get_element_type().get_type_name(), "tensor(float)"))


@dataclass(frozen=True)
class Layer:
    """One layer of OpenVINO's runtime model: its type, the precision it runs in, and the
    original ONNX nodes it computes."""

    name: str
    type: str
    precision: str
    original: tuple[str, ...]
    input_original: tuple[str, ...] = ()  # the original nodes of the layers feeding it


def runtime_layers(model: str | os.PathLike | bytes, execution: Execution, threads: int = 0) -> list[Layer]:
    """Every layer of the runtime model OpenVINO compiled from `model` with the deployment settings."""
    compiled = compile_model(model, execution, threads)
    def originals(op) -> tuple[str, ...]:
        info = op.get_rt_info()
        text = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else ""
        return tuple(n for n in text.split(",") if n)

    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()

        def text(key: str) -> str:
            return info[key].astype(str) if key in info else ""

        feeding = tuple(n for i in range(op.get_input_size()) for n in originals(op.input_value(i).get_node()))
        layers.append(Layer(op.get_friendly_name(), text("layerType"), text("runtimePrecision"), originals(op),
                            feeding))
    return layers
