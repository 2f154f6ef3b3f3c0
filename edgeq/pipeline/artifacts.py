"""Typed keys of the results one pass hands to later ones (`PassContext.artifacts`).

Every key lives here, so a reader sees at once what flows between passes, who produces it and
what type it has; passes never spell a key as a string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:  # types only: importing them at run time would tie this module to every pass
    from edgeq.backends.fpga.integer.program import IntegerProgram
    from edgeq.calibration.sources import CalibrationSource
    from edgeq.quant.plan import QuantPlan

T = TypeVar("T")


@dataclass(frozen=True)
class ArtifactKey(Generic[T]):
    """The key of one artifact: what it is and who produces it (for the error when it is missing)."""

    name: str
    producer: str

    def __repr__(self) -> str:
        return f"ArtifactKey({self.name!r})"


# Inputs the compile puts in the context before the pipeline runs.
CALIBRATION_DATA: ArtifactKey[CalibrationSource] = ArtifactKey("calibration data", "compile (--calib)")

# Results of passes, consumed by later passes or by the report.
QUANT_PLAN: ArtifactKey[QuantPlan] = ArtifactKey("quantization plan", "select-precision")
ACTIVATION_RANGES: ArtifactKey[dict[str, Any]] = ArtifactKey("activation ranges", "calibrate")
CALIBRATION_STATISTICS: ArtifactKey[Any] = ArtifactKey("calibration statistics", "calibrate")
# Weights rounded by GPTQ/AWQ, keyed like insert-qdq's weight cache: (q, scale, zero point).
WEIGHT_ROUNDING: ArtifactKey[dict[Any, tuple]] = ArtifactKey("rounded weights", "gptq or awq")
GPTQ_ERRORS: ArtifactKey[list[dict[str, Any]]] = ArtifactKey("GPTQ per-layer errors", "gptq")
AWQ_CHOICES: ArtifactKey[list[dict[str, Any]]] = ArtifactKey("AWQ per-group choices", "awq")
SMOOTHING: ArtifactKey[dict[str, Any]] = ArtifactKey("SmoothQuant alphas", "smooth-quant")
ROTATION: ArtifactKey[Any] = ArtifactKey("rotation summary", "hadamard-rotation")
# Why a rotation the target would have applied to a graph of another structure did not run (a
# sentence for the report and the summary: what --rotate would do instead, and at what cost).
ROTATION_DECLINED: ArtifactKey[str] = ArtifactKey("rotation declined", "hadamard-rotation")
# Linear (op name) -> input columns the LLM.int8-style decomposition runs in float, with the threshold.
OUTLIER_COLUMNS: ArtifactKey[Any] = ArtifactKey("outlier columns", "decompose-outliers")
SENSITIVITY: ArtifactKey[list[Any]] = ArtifactKey("sensitivity ranking", "sensitivity")
INTEGER_PROGRAM: ArtifactKey[IntegerProgram] = ArtifactKey("integer program", "lower-to-integer")
