"""The base of an integer program's steps (edgeq.backends.fpga.integer.program): a step reads and
writes named integer tensors, emits ONNX nodes into an `IntGraphBuilder` and has a numpy `run`
that is bit-identical to what ONNX Runtime computes for those nodes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from edgeq.backends.fpga.integer.builder import IntGraphBuilder

F32 = np.dtype(np.float32)

Scale = float | tuple[float, ...]   # per tensor, or per last-axis channel


class Step:
    """Base of all steps: `out` names the result, `unit` the hardware unit it belongs to
    (kind@instance, read by the FPGA estimator from the nodes' metadata)."""

    kind: ClassVar[str]
    out: str
    unit: str

    def inputs(self) -> tuple[str, ...]:
        raise NotImplementedError

    def emit(self, b: IntGraphBuilder) -> str:
        raise NotImplementedError

    def run(self, env: Mapping[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError


def dtype_of(name: str) -> np.dtype:
    """A step's dtype field ("int8", "int32", ...) as a numpy dtype."""
    return np.dtype(name)
