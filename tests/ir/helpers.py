"""Shared helpers of the IR tests: run a model in ONNX Runtime, compare outputs bit for bit."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import edgeq


def session(model: str | os.PathLike | bytes | onnx.ModelProto) -> ort.InferenceSession:
    """A single-threaded CPU session (deterministic kernels, gentle on shared machines)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # ORT warns about unused initializers of real models
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = str(model)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def run(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def assert_bit_identical(expected: list[np.ndarray], actual: list[np.ndarray], what: str = "") -> None:
    """Same count, dtypes, shapes and bytes (so NaN == NaN and -0.0 != 0.0); strings by value."""
    assert len(expected) == len(actual), f"{what}: {len(expected)} outputs != {len(actual)}"
    for i, (a, b) in enumerate(zip(expected, actual)):
        a, b = np.asarray(a), np.asarray(b)
        label = f"{what} output {i}"
        assert a.dtype == b.dtype, f"{label}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{label}: shape {a.shape} != {b.shape}"
        if a.dtype == object:
            assert np.array_equal(a, b), f"{label}: string values differ"
        else:
            assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), f"{label}: values differ"
            assert a.tobytes() == b.tobytes(), f"{label}: values equal but bits differ (signed zero or NaN payload)"


def roundtrip(src: str | os.PathLike | onnx.ModelProto, dst: Path, **save_options) -> Path:
    """edgeq.save(edgeq.load(src), dst)."""
    return edgeq.save(edgeq.load(src), dst, **save_options)


def write_model(model: onnx.ModelProto, path: Path) -> Path:
    """Write a small in-memory model with onnx itself (the 'original' of a round-trip)."""
    onnx.save_model(model, str(path))
    return path
