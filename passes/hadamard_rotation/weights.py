"""The rotation's weight transforms: per weight, the scalings, rotations and offsets the
planning decided (`WeightPlan`), applied once per weight in float64 after every check is done,
so a refused graph is left untouched."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from edgeq.ir import Graph, Op, Value
from edgeq.quant.hadamard import Rotation


class WeightPlan:
    """Per weight, the transforms to apply in order: ('scale', axis, vector) multiplies along the
    axis, ('rotate', axis, Rotation) right-multiplies that axis by the rotation (for W [in, out]:
    axis 0 gives Q^T W, axis 1 gives W Q). Applied once per weight in float64."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.transforms: dict[Value, list[tuple[str, int, object]]] = defaultdict(list)

    def add(self, value: Value, axis: int, rotation: Rotation) -> None:
        self.transforms[value].append(("rotate", axis, rotation))

    def add_scale(self, value: Value, axis: int, vector: np.ndarray) -> None:
        self.transforms[value].append(("scale", axis, vector))

    def add_offset(self, value: Value, vector: np.ndarray) -> None:
        self.transforms[value].append(("offset", 0, vector))

    def weight_of(self, op: Op) -> Value:
        return self.graph.inputs_of(op)[1]

    def apply(self, graph: Graph) -> None:
        for value, steps in self.transforms.items():
            graph.set_const(value, _transformed(value.const.numpy(), steps))


_SLICE_ELEMENTS = 1 << 22


def _transformed(original: np.ndarray, steps: list[tuple[str, int, object]]) -> np.ndarray:
    """The steps applied in float64; a large 2-D weight whose steps all act along one axis
    (embedding table, LM head: 28M values, 226 MB each in float64) in slices along the other."""
    axes = {axis for kind, axis, _ in steps if kind != "offset"}
    if original.ndim != 2 or original.size <= _SLICE_ELEMENTS or len(axes) != 1 or \
            any(kind == "offset" for kind, _, _ in steps):
        return _apply_steps(original, steps).astype(original.dtype)
    free = 1 - axes.pop()
    out = np.empty(original.shape, original.dtype)
    width = max(1, _SLICE_ELEMENTS // original.shape[1 - free])
    for start in range(0, original.shape[free], width):
        index = (slice(start, start + width), slice(None)) if free == 0 else (slice(None), slice(start, start + width))
        out[index] = _apply_steps(original[index], steps)
    return out


def _apply_steps(original: np.ndarray, steps: list[tuple[str, int, object]]) -> np.ndarray:
    array = np.asarray(original, dtype=np.float64)
    for kind, axis, arg in steps:
        if kind == "offset":
            array = array + np.asarray(arg, dtype=np.float64).reshape(array.shape)
        elif kind == "scale":
            shape = [1] * array.ndim
            shape[axis] = -1
            array = array * np.asarray(arg, dtype=np.float64).reshape(shape)
        else:
            array = arg.apply(array, axis)
    return array
