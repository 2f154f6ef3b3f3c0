"""Fixtures for the integer-kernel tests: running emitted graphs in ONNX Runtime."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeq.backends.fpga.integer import IntGraphBuilder, QTensor

RunModel = Callable[[onnx.ModelProto, dict[str, np.ndarray]], np.ndarray]
RunKernel = Callable[..., np.ndarray]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2  # the CI/dev machines are shared: stay within two cores
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def run_model() -> RunModel:
    """Run a model in ORT's CPU provider; returns its first output."""
    def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return _session(model).run(None, feeds)[0]
    return run


@pytest.fixture(scope="session")
def run_kernel(run_model: RunModel) -> RunKernel:
    """Emit `kernel` (a plan's emit or an emit_* partial) on integer inputs and run it in ORT.

    run_kernel(kernel, x=(array, scale), mask=(array, scale), ...): keyword inputs become
    QTensors with the array's dtype and are passed to the kernel in order.
    """
    def run(kernel: Callable[..., QTensor], **inputs: tuple[np.ndarray, float]) -> np.ndarray:
        builder = IntGraphBuilder()
        tensors = [QTensor(name, array.dtype, scale) for name, (array, scale) in inputs.items()]
        out = kernel(builder, *tensors)
        model = builder.to_model([(t, list(inputs[t.name][0].shape)) for t in tensors], [out])
        result = run_model(model, {name: array for name, (array, _) in inputs.items()})
        assert result.dtype == out.dtype
        return result
    return run


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20210105)  # I-BERT's arXiv date; any fixed seed
