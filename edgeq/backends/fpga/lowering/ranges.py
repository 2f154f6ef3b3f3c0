"""Calibrated ranges of the float tensors the integer datapath stands for.

The lowering runs twice: a dry run against `RangeRequests` (which answers placeholder ranges and
records every tensor asked for), then the real one against `CalibratedRanges`. Between them,
`calibrated_ranges` reuses the calibrate pass's statistics where they carry per-channel min/max
and collects the rest in one calibration run of the float graph (`with_rotations` adds the
rotated tensors the datapath requantizes); `second_moments` gathers the linear layers' input
second moments X^T X that GPTQ rounding needs.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from edgeq.calibration.collection import CollectionOptions, calibrate
from edgeq.calibration.layer_inputs import ActivationStream, input_statistics
from edgeq.errors import CalibrationError, OptionError
from edgeq.ir import Graph, clone_graph, save
from edgeq.options import CalibrationOptions, range_method
from edgeq.quant.hadamard import sylvester
from edgeq.targets.base import QSpec

ROTATED = "::hadamard"   # calibration name of a rotated tensor: f"{name}{ROTATED}{block}"


def rotated_name(name: str, block: int) -> str:
    """The calibration name of float tensor `name` times blockdiag(H_block)."""
    return f"{name}{ROTATED}{block}"


class CalibratedRanges:
    """Calibrated ranges: `act` for int8 tensors (configured method), `bound` for int32 grids."""

    def __init__(self, stats, options: CalibrationOptions):
        self.stats = stats
        self.options = options
        self.moments: dict[str, np.ndarray] = {}   # linear input -> X^T X over calibration tokens

    def second_moment(self, name: str) -> np.ndarray | None:
        return self.moments.get(name)

    def act(self, name: str) -> tuple[float, float]:
        return self.stats[name].range(range_method(self.options.method, 8), symmetric=True,
                                      percentile=self.options.percentile, num_bits=8)

    def pow2_mse(self, name: str, scale: float, spec: QSpec) -> float:
        """Of scale * 2^j, j = 1, 0, -1, -2, -3, the one with the least expected squared error on
        the calibration histogram (bin centres: beyond the int range the clipped distance squared,
        inside step^2 / 12); `scale` itself without a histogram (minmax calibration)."""
        hist = self.stats[name].histogram
        if hist is None or not hist.counts.sum():
            return scale
        edges = hist.edges()
        centres, counts = (edges[:-1] + edges[1:]) / 2, hist.counts.astype(np.float64)
        best, best_error = scale, math.inf
        for j in (0, 1, -1, -2, -3):   # the covering one first: it wins ties
            step = math.ldexp(scale, j)
            lo, hi = spec.qmin * step, spec.qmax * step
            error = float((counts * np.where(centres > hi, (centres - hi) ** 2,
                                             np.where(centres < lo, (centres - lo) ** 2, step * step / 12))).sum())
            if error < best_error:
                best, best_error = step, error
        return best

    def bound(self, name: str) -> float:
        lo, hi = self.stats[name].range("minmax", symmetric=True)
        return float(max(-lo, hi))

    def channel(self, name: str) -> np.ndarray:
        """Largest magnitude per last-axis channel (min/max over the calibration data)."""
        return np.asarray(self.stats[name].channel_range(symmetric=True)[1], np.float64)


class RangeRequests:
    """Dry-run ranges: answers placeholders ((-1, 1), a bound of 1) and remembers every tensor
    asked for (`names`) and every linear input whose second moments were asked for."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.names: list[str] = []
        self.linear_inputs: list[str] = []

    def second_moment(self, name: str) -> None:
        if name not in self.linear_inputs:
            self.linear_inputs.append(name)
        return None

    def act(self, name: str) -> tuple[float, float]:
        self._note(name)
        return -1.0, 1.0

    def pow2_mse(self, name: str, scale: float, spec: QSpec) -> float:
        return scale

    def bound(self, name: str) -> float:
        self._note(name)
        return 1.0

    def channel(self, name: str) -> np.ndarray:
        self._note(name)
        shape = self.graph.value(name).shape
        if not shape or not isinstance(shape[-1], int):
            raise OptionError(f"'{name}' has no static last dimension (run shape inference first)")
        return np.ones(shape[-1])

    def _note(self, name: str) -> None:
        if name not in self.names:
            self.names.append(name)


Ranges = CalibratedRanges | RangeRequests


def calibrated_ranges(graph: Graph, names: Iterable[str], known: Mapping | None, data,
                      options: CalibrationOptions, threads: int) -> CalibratedRanges:
    """Statistics of tensors `names`: those in `known` (the calibrate pass's) where they carry
    per-channel min/max, the rest from one calibration run of the float graph on `data`."""
    names = list(names)
    known = known or {}
    usable = {n for n in names if n in known and known[n].channel_min is not None}
    missing = [n for n in names if n not in usable]
    stats = {n: known[n] for n in usable}
    if missing:
        if data is None:
            raise CalibrationError(f"{len(missing)} tensors of the integer datapath need calibration data",
                                   fix="pass --calib DIR|FILE.npz or calibration=... to compile")
        collection = CollectionOptions(histogram=options.method != "minmax", channel_axis=-1, threads=threads)
        with tempfile.TemporaryDirectory(prefix="edgeq-lower-") as tmp:
            path = Path(tmp) / "float.onnx"
            save(with_rotations(graph, missing), path)
            result = calibrate(str(path), data, missing, collection)
        stats.update((n, result[n]) for n in missing)
    return CalibratedRanges(stats, options)


def second_moments(graph: Graph, names: list[str], data, threads: int) -> dict[str, np.ndarray]:
    """X^T X over the calibration tokens of each linear input in `names` (for GPTQ rounding)."""
    if data is None:
        raise CalibrationError("GPTQ weight rounding needs calibration data",
                               fix="pass calibration data, or weight_rounding='nearest'")
    with ActivationStream(graph, data, threads) as stream:
        stats = input_statistics(stream, names)
    return {name: entry.hessian for name, entry in stats.items()}


def with_rotations(graph: Graph, names: Iterable[str]) -> Graph:
    """`graph` plus a float x @ blockdiag(H_b) for every requested f"{x}{ROTATED}{b}" name, so
    the calibration run measures the ranges of the rotated tensors the datapath requantizes."""
    wanted = [n for n in names if ROTATED in n]
    if not wanted:
        return graph
    graph = clone_graph(graph)
    for name in wanted:
        source, block = name.rsplit(ROTATED, 1)
        x = graph.value(source)
        channels = x.shape[-1] if x.shape else None
        if isinstance(channels, int):
            matrix = np.kron(np.eye(channels // int(block)), sylvester(int(block))).astype(np.float32)
            graph.add_op("MatMul", [x, graph.add_constant(f"{source}_hadamard", matrix)], [name])
            continue
        # last dim not static (the lowering knows it divides by `block`): rows of `block` elements
        rows = graph.add_op("Reshape", [x, graph.add_constant(f"{source}_hadamard_rows",
                                                              np.asarray([-1, int(block)], np.int64))], 1)
        product = graph.add_op("MatMul", [graph.outputs_of(rows)[0], graph.add_constant(
            f"{source}_hadamard", sylvester(int(block)).astype(np.float32))], 1)
        shape = graph.add_op("Shape", [x], 1)
        graph.add_op("Reshape", [graph.outputs_of(product)[0], graph.outputs_of(shape)[0]], [name])
    return graph
