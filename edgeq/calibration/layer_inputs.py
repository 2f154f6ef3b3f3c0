"""Layer-input statistics for weight rounding (GPTQ, AWQ), streamed from the float model.

Both passes look at one thing per quantized linear layer y = x W: the second moment of its
input, H = 2/n * sum_t x_t x_t^T (K x K, float64; GPTQ's normalisation), plus for AWQ the
mean |x| per input channel. The layer's output error on the calibration data for any weight
error E = W_q - W is exactly tr(E^T H E) / 2 per token, so GPTQ's compensation, AWQ's scale
search and AWQ's clip search all work from H (`edgeq.quant.rounding`): no activations are kept.

Streaming: the float graph runs in ONNX Runtime as a `FloatModel` (weights memory-mapped and
fed, only the nodes leading to the requested tensors), one calibration sample at a time; the
requested inputs are folded into their H and dropped. The inputs are taken a few at a time
(`hessian_chunks`), so at most `budget_bytes` of Hessians exist at once; the caller consumes
each chunk's statistics before the next chunk is computed. Linears that share an input
(q/k/v, gate/up) share one H (`edgeq.quant.linears.linear_groups`).
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.calibration.float_model import FloatModel, load_model
from edgeq.ir import Graph, save
from edgeq.quant.linears import LinearGroup


@dataclass
class InputStats:
    """Second moment of one layer input over the calibration tokens."""

    hessian: np.ndarray          # float64 [K, K]: 2/n * X^T X
    abs_mean: np.ndarray | None  # float64 [K]: mean |x| per channel (when asked for)
    tokens: int


class ActivationStream:
    """The float graph in ONNX Runtime, able to return any of its tensors per calibration
    sample. The graph is saved once (weights to a side file, memory-mapped and fed to ORT)."""

    def __init__(self, graph: Graph, data, threads: int = 0):
        self.data = data
        self._tmp = tempfile.TemporaryDirectory(prefix="edgeq-rounding-")
        path = Path(self._tmp.name) / "model.onnx"
        save(graph, path, external_data=True)
        proto, base_dir = load_model(path)
        self._model = FloatModel(proto, base_dir, threads)
        self.passes = 0

    def samples(self, names: Sequence[str]) -> Iterator[list[np.ndarray]]:
        """Per calibration sample, the requested tensors as float32 [tokens, channels]."""
        run = self._model.runner(list(names))
        self.passes += 1
        for feed in self.data:
            yield [np.asarray(a, np.float32).reshape(-1, a.shape[-1]) for a in run(feed)]

    def substitute(self, name: str, array: np.ndarray) -> bool:
        """Feed `array` for the weight `name` from now on (e.g. its quantized value, so later
        layers see the error of earlier ones); False if that weight is not fed but inline."""
        weights = self._model.weights
        if name not in weights or weights[name].shape != array.shape:
            return False
        weights[name] = np.ascontiguousarray(array, dtype=weights[name].dtype)
        return True

    def close(self) -> None:
        self._model = None
        self._tmp.cleanup()

    def __enter__(self) -> "ActivationStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def hessian_chunks(groups: Sequence[LinearGroup], graph: Graph, budget_bytes: int) -> list[list[LinearGroup]]:
    """Consecutive groups whose float64 Hessians together fit `budget_bytes` (at least one each)."""
    chunks: list[list[LinearGroup]] = []
    used = budget_bytes + 1
    for group in groups:
        k = input_width(graph, group)
        size = 8 * k * k
        if used + size > budget_bytes and (not chunks or chunks[-1]):
            chunks.append([])
            used = 0
        chunks[-1].append(group)
        used += size
    return [c for c in chunks if c]


def input_width(graph: Graph, group: LinearGroup) -> int:
    """K, the number of input channels of the group's linears (its Hessian is K x K)."""
    lin = group.linears[0]
    dims = graph.constant(graph.inputs_of(lin.op)[1]).dims
    return int(dims[1] if lin.transposed else dims[0])


def input_statistics(stream: ActivationStream, names: Sequence[str], *, abs_mean: bool = False
                     ) -> dict[str, InputStats]:
    """H (and mean |x|) of each named tensor over every calibration sample, in one pass."""
    names = list(dict.fromkeys(names))
    sums: dict[str, np.ndarray] = {}
    abs_sums: dict[str, np.ndarray] = {}
    tokens = defaultdict(int)
    for arrays in stream.samples(names):
        for name, x in zip(names, arrays):
            gram = x.T @ x  # float32 GEMM per sample, accumulated in float64
            if name in sums:
                sums[name] += gram
            else:
                sums[name] = gram.astype(np.float64)
            if abs_mean:
                part = np.abs(x).sum(axis=0, dtype=np.float64)
                abs_sums[name] = abs_sums[name] + part if name in abs_sums else part
            tokens[name] += x.shape[0]
        del arrays
    out = {}
    for name in names:
        n = max(tokens[name], 1)
        hessian = sums.pop(name)
        hessian *= 2.0 / n
        out[name] = InputStats(hessian, abs_sums[name] / n if abs_mean else None, tokens[name])
    return out


def channel_means(stream: ActivationStream, names: Sequence[str], *, axis: int = 1) -> dict[str, np.ndarray]:
    """Mean of each named tensor per channel (`axis`: 1 for NCHW activations and [M, K] rows'
    columns alike) over every calibration sample, in one pass (float64)."""
    names = list(dict.fromkeys(names))
    sums: dict[str, np.ndarray] = {}
    counts = defaultdict(int)
    run = stream._model.runner(names)
    stream.passes += 1
    for feed in stream.data:
        for name, x in zip(names, run(feed)):
            x = np.moveaxis(np.asarray(x, np.float32), axis, -1).reshape(-1, x.shape[axis])
            part = x.sum(axis=0, dtype=np.float64)
            sums[name] = sums[name] + part if name in sums else part
            counts[name] += x.shape[0]
    return {name: sums[name] / max(counts[name], 1) for name in names}
