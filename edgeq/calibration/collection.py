"""Statistics collection: run the float model over calibration data and stream each requested
tensor into its statistics.

    stats = calibrate("model.onnx", TokenWindows(ids, 256, 16, first_window=1000),
                      tensors=["x", "h"], options=CollectionOptions(channel_axis=-1))
    lo, hi = stats["x"].range("percentile", symmetric=True, percentile=99.99)
    stats.save("calib.npz"); again = CalibrationResult.load("calib.npz")

Memory is bounded by the model plus one sample's requested activations: samples stream one
at a time and each tensor's values are folded into a `TensorAccumulator` and dropped. The
model runs as a `FloatModel` (weights held once, only the nodes the tensors need).
`outputs_per_run` splits the requested tensors into groups, one session and one pass over the
data per group, for models whose activations of one sample do not fit at once.

Determinism: a fixed thread count and exact statistics give the same result bit for bit, for
any sample order and any `outputs_per_run`.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from edgeq.calibration.float_model import FloatModel, load_model
from edgeq.calibration.sources import ModelLike, open_source
from edgeq.calibration.statistics import CalibrationResult, TensorAccumulator
from edgeq.errors import OptionError
from edgeq.progress import follow
from edgeq.runtime.execution import Execution


@dataclass(frozen=True)
class CollectionOptions:
    """How statistics are collected.

    histogram: collect histograms (needed by the percentile, entropy and mse ranges).
    histogram_bins: most bins per histogram; at least half of them span the data.
    channel_axis: also keep min/max per channel along this axis (e.g. -1, the hidden dim);
        tensors of rank 0 get none.
    threads: ONNX Runtime intra-op threads; results are bit-identical for a fixed count.
    outputs_per_run: fetch at most this many tensors per run (one pass over the data each);
        None fetches all at once.
    progress: show a tqdm bar; None shows it only when stderr is a terminal; an object with a
        `task` method (a PassContext: its instruments show it) follows the runs instead.
    execution: where the float model runs (at full precision), e.g. the target's provider.
    """

    histogram: bool = True
    histogram_bins: int = 4096
    channel_axis: int | None = None
    threads: int = 1
    outputs_per_run: int | None = None
    progress: Any = None   # bool | None | a progress follower (see above)
    execution: Execution | None = None  # the runtime the float model runs on (fp32); None: ORT's CPU provider

    def __post_init__(self) -> None:
        if self.histogram_bins < 16:
            raise OptionError(f"histogram_bins={self.histogram_bins} is too few", fix="use at least 16 (default 4096)")
        if self.threads < 1:
            raise OptionError(f"threads={self.threads}", fix="use 1 or more threads")
        if self.outputs_per_run is not None and self.outputs_per_run < 1:
            raise OptionError(f"outputs_per_run={self.outputs_per_run}", fix="use None or a positive count")


def calibrate(model: ModelLike, data: Any, tensors: Sequence[str],
              options: CollectionOptions = CollectionOptions()) -> CalibrationResult:
    """Statistics of `tensors` over the samples of `data` (anything `open_source` takes)."""
    proto, base_dir = load_model(model)
    source = open_source(data, proto)
    names = _check_tensor_names(proto.graph, tensors)
    float_model = FloatModel(proto, base_dir, options.threads, options.execution)
    del proto  # a model loaded here from a path is freed before the long loop
    bins = options.histogram_bins if options.histogram else None
    accumulators = {name: TensorAccumulator(name, bins, options.channel_axis) for name in names}
    groups = _output_groups(names, options.outputs_per_run)
    with _progress(len(source) * len(groups), options.progress) as advance:
        for group in groups:
            run = float_model.runner(group)
            for feed in source:
                values = run(feed)
                for name in group:
                    accumulators[name].update(values.pop(0))  # drop each array once counted
                advance()
            del run  # the group's session goes before the next one is made
    return CalibrationResult({name: acc.finish() for name, acc in accumulators.items()},
                             len(source), options.histogram_bins)


def _check_tensor_names(graph: onnx.GraphProto, tensors: Sequence[str]) -> list[str]:
    weights = {t.name for t in graph.initializer}
    known = {name for node in graph.node for name in node.output if name}
    known |= {value.name for value in graph.input if value.name not in weights}
    if isinstance(tensors, str):
        raise OptionError(f"tensors='{tensors}' is one string", fix="pass a list of tensor names")
    tensors = list(tensors)
    if not tensors:
        raise OptionError("no tensors to calibrate", fix="pass a list of tensor names (see float_activation_names)")
    for name in tensors:
        if name in weights:
            raise OptionError(f"'{name}' is a weight (initializer), not an activation",
                              fix="calibrate activations; weights are quantized from their values")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "see float_activation_names(model)"
            raise OptionError(f"'{name}' is not a tensor of the model's main graph", fix=hint)
    return list(dict.fromkeys(tensors))


def _output_groups(names: Sequence[str], size: int | None) -> list[list[str]]:
    size = size or len(names)
    return [list(names[start:start + size]) for start in range(0, len(names), size)]


@contextmanager
def _progress(total: int, show: Any) -> Iterator[Callable[[], None]]:
    if callable(getattr(show, "task", None)):
        with follow(show, "calibration runs", total, "run") as advance:
            yield advance
        return
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        yield lambda: None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc="calibrating", unit="run", file=sys.stderr) as bar:
        yield lambda: bar.update(1)


def channel_absmax(graph, data, names: Sequence[str], *, threads: int = 1, progress: Any = None
                   ) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each named tensor of the float `graph` (an edgeq Graph)
    over every calibration sample and token. The graph is saved with its weights as external
    data, which calibration maps instead of copying into a proto."""
    import tempfile
    from pathlib import Path

    from edgeq.ir import save

    with tempfile.TemporaryDirectory(prefix="edgeq-channels-") as tmp:
        path = Path(tmp) / "model.onnx"
        save(graph, path, external_data=True)
        stats = calibrate(str(path), data, list(names),
                          CollectionOptions(histogram=False, channel_axis=-1, threads=threads or 1, progress=progress))
    return {n: np.maximum(np.abs(stats[n].channel_min), np.abs(stats[n].channel_max)) for n in names}

