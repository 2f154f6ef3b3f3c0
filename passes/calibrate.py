"""Run the (preprocessed) float model on calibration data and fix each quantized tensor's range."""

from __future__ import annotations

import tempfile
from pathlib import Path

from edgeq.calibration.collection import CollectionOptions, calibrate
from edgeq.calibration.statistics import CalibrationResult
from edgeq.errors import CalibrationError
from edgeq.ir import Graph, save
from edgeq.options import CalibrationOptions, range_method
from edgeq.pipeline import Pass, PassContext, PassResult
from edgeq.pipeline.artifacts import ACTIVATION_RANGES, CALIBRATION_DATA, CALIBRATION_STATISTICS, QUANT_PLAN
from edgeq.registry import register_pass



@register_pass
class Calibrate(Pass):
    name = "calibrate"
    description = "collect activation statistics in ONNX Runtime and choose quantization ranges"

    def __init__(self, options: CalibrationOptions | None = None, threads: int = 0):
        self.options = options or CalibrationOptions()
        self.threads = threads

    @classmethod
    def from_options(cls, options, target) -> "Calibrate":
        return cls(options.calibration, options.threads)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        plan = ctx.artifact(QUANT_PLAN, self.name)
        sources = plan.activation_sources(graph)
        overrides_fixed = set()
        if not sources:
            ctx.artifacts[ACTIVATION_RANGES] = {}
            return PassResult(graph, False, {"tensors": 0})
        data = ctx.artifacts.get(CALIBRATION_DATA)
        if data is None:
            raise CalibrationError(
                f"{len(sources)} activation tensors need calibration data but none was given",
                fix="pass --calib DIR|FILE.npz or --calib-text, or --activations float for weight-only")
        names = sorted(n for n in sources if n not in overrides_fixed)
        stats_options = CollectionOptions(histogram=self.options.method != "minmax",
                                          threads=self.threads or 1, execution=ctx.target.execution,
                                          progress=ctx)
        with tempfile.TemporaryDirectory(prefix="edgeq-calib-") as tmp:
            path = Path(tmp) / "model.onnx"
            save(graph, path, external_data=True)  # ORT is fed memory-mapped weights, not a proto copy
            stats = calibrate(str(path), data, names, stats_options)
        ctx.artifacts[CALIBRATION_STATISTICS] = stats
        ctx.artifacts[ACTIVATION_RANGES] = self._ranges(stats, sources)
        return PassResult(graph, False, {"tensors": len(names), "samples": stats.num_samples
                                         if hasattr(stats, "num_samples") else len(data)})

    def _ranges(self, stats: CalibrationResult, sources) -> dict[str, tuple[float, float]]:
        ranges = {}
        for name, uses in sources.items():
            spec = uses[0][2]
            method = range_method(self.options.method, spec.bits)
            # A spec stored unsigned when the tensor is non-negative takes that tensor's own range.
            symmetric = spec.symmetric and not (spec.unsigned_when_nonnegative and stats[name].min >= 0)
            ranges[name] = stats[name].range(method, symmetric=symmetric,
                                             percentile=self.options.percentile, num_bits=spec.bits)
        return ranges
